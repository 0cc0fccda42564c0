"""``kvcomm eval --workload rag``: the RAG pipeline free-running (task level) and teacher-forced."""

from __future__ import annotations

import pytest

from kvcomm.tools.rag import AGENTS, QUESTIONS, documents
from kvcomm.tools.rag_eval import rag_workload, render_task, run_rag_eval


def test_there_are_enough_questions_and_each_answer_is_in_the_corpus():
    assert len(QUESTIONS) >= 40 and len({q for q, _ in QUESTIONS}) == len(QUESTIONS)
    names = {d.split(":", 1)[0].rsplit(".", 1)[1] for d in documents()}
    assert all(expected in names for _, expected in QUESTIONS[20:])  # the questions added for n >= 40


def test_rag_workload_is_the_pipelines_agents_and_retrieved_passages(smollm2):
    from kvcomm.tools.rag_eval import rag_index

    index = rag_index(smollm2.tokenizer)
    wl = rag_workload(index, 2)
    assert wl.name == "rag" and [n for n, _ in wl.agents] == ["expert", "critic", "final"] and wl.agents == AGENTS
    assert [r["question"] for r in wl.requests] == [q for q, _ in QUESTIONS[:2]]
    assert all(set(r) == {"question", "doc:1", "doc:2"} and r["doc:1"] != r["doc:2"] for r in wl.requests)
    with pytest.raises(ValueError, match=f"must be in \\[1, {len(QUESTIONS)}\\]"):
        rag_workload(index, len(QUESTIONS) + 1)


def test_run_rag_eval_reports_hit_rates_against_dense_and_teacher_forced_fidelity(smollm2):
    out = run_rag_eval(smollm2.model, smollm2.tokenizer, fingerprint=smollm2.fingerprint, policies=["naive"],
                       n_requests=1, max_new_tokens=3, exact_tokens=3, progress=False, resamples=200)
    # teacher-forced part: run_eval's result on the RAG agents
    assert out["workload"] == "rag" and out["agents"] == ["expert", "critic", "final"] and out["requests"] == 1
    assert [r["policy"] for r in out["rows"]] == ["naive", "dense"] and out["paired"]["reference"] == "naive"
    assert len(out["calls"]) == 2 * 1 * 3
    # task part: the free-running pipeline
    task = out["task"]
    rows = {r["policy"]: r for r in task["rows"]}
    assert list(rows) == ["naive", "dense"] and task["requests"] == 1
    dense, naive = rows["dense"], rows["naive"]
    assert dense["final_differs"] == 0 and dense["hit_rate_diff_vs_dense"] == 0 and dense["call_reuse_pct"] == 0
    assert naive["dense_hit_rate"] == dense["hit_rate"] and 0 <= naive["final_differs"] <= 1
    assert naive["hit_rate"] - dense["hit_rate"] == pytest.approx(naive["hit_rate_diff_vs_dense"])
    assert naive["hits"] - dense["hits"] == naive["hits_gained"] - naive["hits_lost"]
    assert naive["call_reuse_pct"] == 100.0 and naive["speedup_reuse_calls"] > 0 and naive["errors"] == 0
    assert len(task["calls"]) == 2 * 1 * 3 and {c["agent"] for c in task["calls"]} == {"expert", "critic", "final"}
    assert all(c["same_as_dense"] for c in task["calls"] if c["policy"] == "dense")
    assert [a["question"] for a in task["answers"]] == [q for q, _ in QUESTIONS[:1]]
    assert all(set(a["final"]) == {"naive", "dense"} for a in task["answers"])
    text = render_task(task)
    assert "RAG pipeline, free-running" in text and "hit − dense" in text and "final differs" in text


def test_rag_eval_without_the_free_run_gives_the_fidelity_tables_only(smollm2, monkeypatch):
    from click.testing import CliRunner

    import kvcomm.models
    import kvcomm.tools.rag_eval as rag_eval
    from kvcomm.tools.cli import main

    def no_free_run(*args, **kwargs):
        raise AssertionError("the free run ran")

    monkeypatch.setattr(rag_eval, "run_task", no_free_run)
    out = run_rag_eval(smollm2.model, smollm2.tokenizer, fingerprint=smollm2.fingerprint, policies=["naive"],
                       n_requests=1, max_new_tokens=2, exact_tokens=2, progress=False, resamples=50,
                       free_running=False)
    assert out["task"] is None and [r["policy"] for r in out["rows"]] == ["naive", "dense"]
    assert len(out["calls"]) == 2 * 1 * 3
    monkeypatch.setattr(kvcomm.models, "load_model", lambda *a, **k: smollm2)
    res = CliRunner().invoke(main, ["eval", "--workload", "rag", "--no-free-run", "--n", "1", "--max-new-tokens", "2",
                                    "--policies", "naive"])
    assert res.exit_code == 0, res.output
    assert "RAG agents, teacher-forced" in res.output and "free-running" not in res.output
