"""The README decorator example and the example pipelines, run for real (tiny sizes)."""

from __future__ import annotations

import importlib
import json
import runpy

import pytest

from kvcomm.metrics import CONTINUATION_KEY, read_jsonl


@pytest.fixture
def examples(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "examples"))  # the scripts import their _common
    return repo_root / "examples"


def test_readme_decorator_example_runs(examples, capsys):
    runpy.run_path(str(examples / "readme_decorator.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].strip()
    assert lines[0] == lines[1]  # the repeated question, answered from reused KV, says the same
    assert "('solver', 'reuse'," in lines[2]


@pytest.mark.parametrize("name", ["math_pipeline", pytest.param("rag_pipeline", marks=pytest.mark.slow),
                                  pytest.param("coding_pipeline", marks=pytest.mark.slow)])
def test_example_pipeline_runs(name, examples, smollm2, tmp_path, capsys):
    module = importlib.import_module(name)
    out = tmp_path / name
    summary = module.main(["--n", "2", "--max-new-tokens", "4", "--run-dir", str(out)], loaded=smollm2)
    assert [r["name"] for r in summary["rows"]] == ["dense", "kvcomm"]
    records = read_jsonl(out / "records.jsonl")
    agents = {r.agent for r in records}
    assert len(records) == 2 * 2 * len(agents) and {r.policy for r in records} == {"dense", "kvcomm"}
    assert set(json.loads((out / "store_stats.json").read_text())) == {"dense", "kvcomm"}
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 4 and all(o[f"{a}_answer"] for o in outputs for a in agents)
    assert summary["rows"][0]["same_as_dense_pct"] == 100.0  # dense against itself
    assert "kvcomm report --run-dir" in capsys.readouterr().out


def test_rag_corpus_is_fixed_size_token_chunks(examples, smollm2):
    # one passage length: every earlier passage is a candidate anchor for a new one (DESIGN §3.2)
    rag = importlib.import_module("rag_pipeline")
    for size in (32, 48):
        passages = rag.corpus(smollm2.tokenizer, size)
        assert len(passages) > 50
        assert {len(smollm2.tokenizer(p, add_special_tokens=False).input_ids) for p in passages} == {size}
    index = rag.BM25(rag.corpus(smollm2.tokenizer, 48))
    assert any("math.gcd" in p for p in index.top("greatest common divisor of two integers", 2))
    with pytest.raises(SystemExit, match="--chunk-tokens 4"):
        rag.main(["--chunk-tokens", "4"], loaded=smollm2)


def test_supervisor_pipeline_runs_with_no_template(examples, smollm2, tmp_path, capsys):
    from kvcomm.tools import report

    module = importlib.import_module("supervisor_pipeline")
    out = tmp_path / "supervisor"
    summary = module.main(["--n", "1", "--max-new-tokens", "3", "--run-dir", str(out)], loaded=smollm2)
    records = read_jsonl(out / "records.jsonl")
    per_policy = {p: [r for r in records if r.policy == p] for p in ("dense", "kvcomm")}
    assert len(per_policy["dense"]) == len(per_policy["kvcomm"]) == summary["calls_per_task"]
    assert [r.agent for r in per_policy["dense"]] == [r.agent for r in per_policy["kvcomm"]]
    assert {r.agent.rpartition("#")[0] for r in records} == {"supervisor", "researcher", "analyst", "writer"}
    kvcomm = per_policy["kvcomm"]
    # the supervisor, called again on its grown history, continues its earlier call
    later = [r for r in kvcomm if r.agent.startswith("supervisor#") and r.agent != "supervisor#1"]
    assert {r.mode for r in later} == {"prefix"} and all(CONTINUATION_KEY in r.slots for r in later)
    assert {row["name"] for row in summary["reuse_kvcomm"]} >= {"supervisor", "ALL"}
    assert any(row["mode"] == "continuation" for row in summary["ttft_kvcomm"])
    assert sum(row["calls"] for row in summary["teacher_forced"]) == len(kvcomm)
    text = report.render(report.build(report.load(run_dir=str(out))))
    assert "supervisor#1" in text and "kvcomm report --run-dir" in capsys.readouterr().out
