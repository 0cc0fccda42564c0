"""``kvcomm eval --workload rag``: the RAG pipeline (:mod:`kvcomm.tools.rag`) as a task-level figure.

Two measurements (the first can be left out: ``free_running=False``, ``--no-free-run``):

- **Task level, free-running**: the LangGraph pipeline (retrieve → expert → critic → final) runs
  under dense and under every row's engine, each agent reading its own upstream answers (what a
  deployment sees). Per row: the hit rate (the final answer names the expected function) against
  dense's, with the paired difference's bootstrap interval, the hits gained and lost, and how many
  final answers differ from dense's. Free-running answers drift apart once one token differs, so
  "differs" counts any deviation, not a wrong answer.
- **Fidelity, teacher-forced**: the same three agents, with the same retrieved passages, through
  :func:`kvcomm.tools.evaluation.run_eval` (unpaired and paired figures, ``--upstream``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from kvcomm.config import KVCommConfig
from kvcomm.errors import AgentConfigError
from kvcomm.tools.eval_stats import RESAMPLES, SEED, bootstrap_means, with_ci
from kvcomm.tools.evaluation import Workload, make_engines, row_configs, run_eval
from kvcomm.tools.rag import AGENTS, BM25, CHUNK_TOKENS, QUESTIONS, build_graph, corpus, is_hit, request_fills


def rag_index(tokenizer: Any, chunk_tokens: int = CHUNK_TOKENS) -> BM25:
    """BM25 over the standard-library corpus, cut into ``chunk_tokens``-token passages."""
    return BM25(corpus(tokenizer, chunk_tokens))


def rag_workload(index: BM25, n_requests: int) -> Workload:
    """The pipeline's three agents over the first ``n_requests`` questions, passages retrieved once."""
    if not 1 <= n_requests <= len(QUESTIONS):
        raise ValueError(f"n_requests={n_requests} must be in [1, {len(QUESTIONS)}] (the RAG questions)")
    return Workload("rag", list(AGENTS), [request_fills(index, q) for q, _ in QUESTIONS[:n_requests]])


def run_rag_eval(
    model: Any,
    tokenizer: Any,
    *,
    fingerprint: str | None = None,
    policies: list[str] | None = None,
    n_requests: int = 40,
    max_new_tokens: int = 48,
    exact_tokens: int = 32,
    configs: dict[str, KVCommConfig] | None = None,
    store_factories: dict[str, Callable[[], Any]] | None = None,
    base_config: KVCommConfig | None = None,
    upstream: str = "own",
    chunk_tokens: int = CHUNK_TOKENS,
    progress: bool = True,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    free_running: bool = True,
) -> dict[str, Any]:
    """The teacher-forced eval on the RAG agents (``run_eval``'s result) plus ``task``: the free run
    (None with ``free_running=False``: the fidelity tables only, in a fraction of the time, as the
    free run decodes every row's answers token by token)."""
    from kvcomm.models import model_fingerprint

    fp = fingerprint or model_fingerprint(model)
    index = rag_index(tokenizer, chunk_tokens)
    workload = rag_workload(index, n_requests)
    base = base_config or KVCommConfig()
    rows_cfg = row_configs(policies, configs, base, max_new_tokens)
    task = (run_task(model, tokenizer, fp, rows_cfg, index, n_requests, store_factories=store_factories,
                     progress=progress, resamples=resamples, seed=seed) if free_running else None)
    out = run_eval(model, tokenizer, fingerprint=fp, policies=policies, max_new_tokens=max_new_tokens,
                   exact_tokens=exact_tokens, configs=configs, store_factories=store_factories, base_config=base,
                   progress=progress, workload=workload, upstream=upstream, resamples=resamples, seed=seed)
    out["chunk_tokens"] = chunk_tokens
    out["task"] = task
    return out


def run_task(model: Any, tokenizer: Any, fingerprint: str, rows_cfg: dict[str, KVCommConfig], index: BM25,
             n_requests: int, *, store_factories: dict[str, Callable[[], Any]] | None = None, progress: bool = True,
             resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """Run the pipeline free under every row; hit rates and answers against dense's."""
    from tqdm.auto import tqdm

    engines = make_engines(model, tokenizer, fingerprint, rows_cfg, store_factories)
    graph = build_graph(index)
    items = QUESTIONS[:n_requests]
    names = [name for name, _ in AGENTS]
    answers: dict[str, list[dict[str, str]]] = {}
    errors: dict[str, list[str | None]] = {}
    calls: list[dict[str, Any]] = []
    bar = tqdm(total=len(items) * len(engines), desc="kvcomm eval rag (free)", disable=not progress)
    for label, eng in engines.items():
        answers[label], errors[label] = [], []
        for i, (question, _) in enumerate(items):
            eng.reset_answers()
            before = len(eng.records)
            try:
                state = graph.invoke({"question": question}, context=eng)
                error = None
            except AgentConfigError as exc:  # an agent answered nothing: the next one has no input
                state, error = {}, str(exc)
            answers[label].append({name: str(state.get(f"{name}_answer", "")) for name in names})
            errors[label].append(error)
            for rec in eng.records[before:]:
                calls.append({"request": i, "agent": rec.agent, "policy": label, "mode": rec.mode,
                              "slots": dict(rec.slots), "ttft_ms": rec.ttft_ms, "prompt_tokens": rec.prompt_tokens,
                              "reused_tokens": rec.reused_tokens, "recomputed_tokens": rec.recomputed_tokens})
            bar.update(1)
    bar.close()
    dense_ttft = {(c["request"], c["agent"]): c["ttft_ms"] for c in calls if c["policy"] == "dense"}
    hits = {label: [is_hit(expected, a["final"]) for (_, expected), a in zip(items, got, strict=True)]
            for label, got in answers.items()}
    for c in calls:
        c["same_as_dense"] = answers[c["policy"]][c["request"]][c["agent"]] == answers["dense"][c["request"]][c["agent"]]
    rows = [_task_row(label, eng, answers, hits, errors[label], [c for c in calls if c["policy"] == label], dense_ttft,
                      resamples, seed) for label, eng in engines.items()]
    per_request = [{"request": i, "question": q, "expected": expected,
                    "final": {label: answers[label][i]["final"] for label in engines},
                    "hit": {label: hits[label][i] for label in engines}}
                   for i, (q, expected) in enumerate(items)]
    return {"requests": len(items), "agents": names, "metric": "hit", "rows": rows, "answers": per_request,
            "calls": calls, "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "over": "requests"}}


def _task_row(label: str, eng: Any, answers: dict[str, list[dict[str, str]]], hits: dict[str, list[bool]],
              errors: list[str | None], mine: list[dict[str, Any]], dense_ttft: dict[tuple[int, str], float],
              resamples: int, seed: int) -> dict[str, Any]:
    got, dense = hits[label], hits["dense"]
    series = {"hit": [float(h) for h in got], "diff": [float(h) - float(d) for h, d in zip(got, dense, strict=True)]}
    ci = bootstrap_means(series, resamples=resamples, seed=seed, level=0.95)
    recs = eng.records
    reuse = [c for c in mine if c["mode"] == "reuse"]
    row: dict[str, Any] = {
        "policy": label, "requests": len(got), "hits": sum(got), "hit_rate": statistics.fmean(series["hit"]),
        "hit_rate_ci": list(ci["hit"]) if ci["hit"] else None,
        "hit_rate_diff_vs_dense": statistics.fmean(series["diff"]),
        "hit_rate_diff_vs_dense_ci": list(ci["diff"]) if ci["diff"] else None,
        "dense_hit_rate": statistics.fmean(float(d) for d in dense),
        "hits_gained": sum(h and not d for h, d in zip(got, dense, strict=True)),
        "hits_lost": sum(d and not h for h, d in zip(got, dense, strict=True)),
        "final_differs": sum(a["final"] != d["final"] for a, d in zip(answers[label], answers["dense"], strict=True)),
        "answers_differ": sum(a != d for a, d in zip(answers[label], answers["dense"], strict=True)),
        "errors": sum(e is not None for e in errors),
        "calls": len(recs),
        "call_reuse_pct": 100.0 * sum(r.mode == "reuse" for r in recs) / max(1, len(recs)),
        "token_reuse_pct": 100.0 * sum(r.reused_tokens for r in recs) / max(1, sum(r.prompt_tokens for r in recs)),
        "ttft_ms": statistics.fmean(r.ttft_ms for r in recs) if recs else None,
        "reuse_calls": len(reuse),
    }
    row["final_differs_pct"] = 100.0 * row["final_differs"] / max(1, len(got))
    paired = [c for c in reuse if (c["request"], c["agent"]) in dense_ttft]
    if paired:
        row["dense_ttft_reuse_calls_ms"] = statistics.fmean(dense_ttft[(c["request"], c["agent"])] for c in paired)
        row["ttft_reuse_calls_ms"] = statistics.fmean(c["ttft_ms"] for c in paired)
        row["speedup_reuse_calls"] = row["dense_ttft_reuse_calls_ms"] / row["ttft_reuse_calls_ms"]
    return row


def render_task(task: dict[str, Any]) -> str:
    """The task-level table of the free-running pipeline."""
    from kvcomm.metrics import format_table

    boot = task["bootstrap"]
    rows = [{**r, "hit_ci": with_ci(r, "hit_rate", ".3f"), "diff_ci": with_ci(r, "hit_rate_diff_vs_dense", "+.3f"),
             "differs": f"{r['final_differs']}/{r['requests']}", "any_differs": f"{r['answers_differ']}/{r['requests']}"}
            for r in task["rows"]]
    head = (f"\nRAG pipeline, free-running ({' -> '.join(task['agents'])}), {task['requests']} requests: hit = the "
            f"final answer names the expected function; [{100 * boot['level']:g}% bootstrap interval over requests, "
            f"{boot['resamples']} resamples, seed {boot['seed']}]; differs = answer text not the dense run's")
    table = format_table(rows, [
        ("policy", "policy", ""), ("hit_ci", "hit", ""), ("diff_ci", "hit − dense", ""), ("hits_gained", "gained", "d"),
        ("hits_lost", "lost", "d"), ("differs", "final differs", ""), ("any_differs", "any answer differs", ""),
        ("call_reuse_pct", "call reuse %", ".1f"), ("token_reuse_pct", "token reuse %", ".1f"),
        ("ttft_ms", "TTFT ms", ".1f"), ("dense_ttft_reuse_calls_ms", "reuse calls: dense TTFT ms", ".1f"),
        ("ttft_reuse_calls_ms", "reuse TTFT ms", ".1f"), ("speedup_reuse_calls", "speed-up", ".2f")])
    failed = [f"{r['policy']}: {r['errors']}" for r in task["rows"] if r["errors"]]
    tail = f"\nrequests that stopped early (an agent answered nothing): {', '.join(failed)}" if failed else ""
    return head + "\n" + table + tail


__all__ = ["rag_index", "rag_workload", "render_task", "run_rag_eval", "run_task"]
