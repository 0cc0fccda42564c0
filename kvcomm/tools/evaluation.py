"""Fidelity harness: every policy against dense on one workload, measured in one run.

Workloads (:class:`~kvcomm.tools.eval_workload.Workload`, in :mod:`kvcomm.tools.eval_workload`):
a fully connected DAG of agents over real questions, or the RAG pipeline's agents
(:mod:`kvcomm.tools.rag_eval`). :mod:`kvcomm.tools.eval_render` renders the results as text.

Teacher forcing: the dense run's answers are fed to every policy (each agent decodes the dense
tokens), so every policy sees the same upstream answer tokens and only the agent's own cache
differs. Greedy exact match over the first N tokens is read off the same forced run: greedy
decoding follows the dense path exactly as long as every step's argmax equals the dense token.
The upstream answers' *KV* is each policy's own (``upstream="own"``: what a deployment sees, so
upstream errors compound) or the dense producer's (``"exact"``: one call's own error).

Each row's figures over its own calls (``rows``, ``by_agent``) compare different call sets from
row to row; ``paired`` measures every row on one set, the calls the ``kvcomm`` row served from
reused KV, with bootstrap intervals (:mod:`kvcomm.tools.eval_stats`). ``calls`` holds every call.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvcomm.config import POLICIES, KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.kv import next_token_margin
from kvcomm.prompt import Content
from kvcomm.template import Template

# the `X as X` imports re-export what moved out of this module: callers import it from here
from kvcomm.tools.eval_render import AGENT_COLUMNS as AGENT_COLUMNS
from kvcomm.tools.eval_render import EVAL_COLUMNS as EVAL_COLUMNS
from kvcomm.tools.eval_render import UPSTREAM_TEXT as UPSTREAM_TEXT
from kvcomm.tools.eval_render import render as render
from kvcomm.tools.eval_stats import RESAMPLES, SEED, bootstrap_ci, fallback_sweep, paired_figures
from kvcomm.tools.eval_workload import AGENT_ROLES as AGENT_ROLES
from kvcomm.tools.eval_workload import Workload, dag_workload, load_questions
from kvcomm.tools.eval_workload import dag_templates as dag_templates


@dataclass
class _Acc:
    first_agree: list[float]
    exact: list[float]
    tf_agree: list[float]
    kl_first: list[float]
    kl_mean: list[float]
    reuse: list[bool]  # the call ran in reuse mode (dense-mode calls agree trivially)
    agents: list[str]  # which agent made the call

    @classmethod
    def new(cls) -> _Acc:
        return cls([], [], [], [], [], [], [])

    def on_reuse(self, values: list[float]) -> list[float]:
        return [v for v, r in zip(values, self.reuse, strict=True) if r]


def _pct_mean(values: list[float]) -> float | None:
    return 100.0 * statistics.fmean(values) if values else None


def _margin(logits: list[torch.Tensor]) -> float:
    """How decisive dense's first token is: its log-probability minus the runner-up's (nats).

    Near 0, any change to the KV, however small, can swap the two: a diagnostic beside the
    agreement figures, never a filter on them."""
    return next_token_margin(logits[0]) if logits else 0.0


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of two next-token distributions given as logits."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return max(0.0, float((lp.exp() * (lp - lq)).sum()))  # >= 0; rounding gives -1e-7 for p == q



UPSTREAMS = ("own", "exact")


def row_configs(policies: list[str] | None, configs: dict[str, KVCommConfig] | None, base: KVCommConfig,
                max_new_tokens: int) -> dict[str, KVCommConfig]:
    """The eval's rows: each policy on ``base``, then the labelled variants, and always ``dense``."""
    rows_cfg: dict[str, KVCommConfig] = {}
    for p in policies or list(POLICIES):
        rows_cfg[p] = base.replace(policy=p, max_new_tokens=max_new_tokens)
    for label, cfg in (configs or {}).items():
        rows_cfg[label] = cfg.replace(max_new_tokens=max_new_tokens)
    rows_cfg.setdefault("dense", base.replace(policy="dense", max_new_tokens=max_new_tokens))
    return rows_cfg


def make_engines(model: Any, tokenizer: Any, fingerprint: str, rows_cfg: dict[str, KVCommConfig],
                 store_factories: dict[str, Callable[[], Any]] | None = None) -> dict[str, KVCommEngine]:
    """One engine per row, each over a fresh store (its factory's, else an in-process memory store)."""

    def new_store(label: str) -> Any:
        if store_factories and label in store_factories:
            return store_factories[label]()
        from kvcomm.store import MemoryStore

        return MemoryStore(device=model.device)

    return {label: KVCommEngine(model, tokenizer, store=new_store(label), config=cfg, fingerprint=fingerprint)
            for label, cfg in rows_cfg.items()}


def run_eval(
    model: Any,
    tokenizer: Any,
    *,
    fingerprint: str | None = None,
    policies: list[str] | None = None,
    n_requests: int = 40,
    n_agents: int = 4,
    max_new_tokens: int = 32,
    exact_tokens: int = 32,
    configs: dict[str, KVCommConfig] | None = None,
    questions: list[str] | None = None,
    store_factories: dict[str, Callable[[], Any]] | None = None,
    base_config: KVCommConfig | None = None,
    progress: bool = True,
    workload: Workload | None = None,
    upstream: str = "own",
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """Run the workload through dense and every policy; returns rows of fidelity and speed.

    ``configs`` maps a row label to a config (e.g. ``{"kvcomm g=1.0": KVCommConfig(gamma=1.0)}``)
    for variants beyond the plain policies; ``store_factories`` maps a row label to the factory of
    its store (default: a fresh in-process memory store per row). ``base_config`` is the config of
    the plain policy rows and of the dense reference, with their ``policy`` (default: the
    defaults; ``kvcomm eval`` passes ``KVCommConfig.from_env()``). Every row runs with
    ``max_new_tokens``.

    ``workload`` is what runs (default: the DAG of ``n_agents`` agents over ``questions``, else
    ``n_requests`` loaded questions). ``upstream`` says whose KV fills a policy's upstream answer
    slots: ``"own"``, the answer its own engine published (what a deployment sees; errors
    compound down the pipeline), or ``"exact"``, the dense producer's answer KV, published into the
    policy's engine with the dense prompt as its context (each call's own error only; the policy
    engines then publish no answers of their own).

    Besides ``rows`` and ``by_agent`` (each row on its own calls), the result has ``calls`` (one
    row per call of every row) and ``paired`` (:func:`kvcomm.tools.eval_stats.paired_figures`:
    every row over the calls the ``kvcomm`` row served in reuse mode, with bootstrap intervals).
    """
    from tqdm.auto import tqdm

    from kvcomm.models import model_fingerprint

    if upstream not in UPSTREAMS:
        raise ValueError(f"upstream={upstream!r} must be one of {', '.join(UPSTREAMS)}")
    exact_upstream = upstream == "exact"
    fp = fingerprint or model_fingerprint(model)
    base = base_config or KVCommConfig()
    rows_cfg = row_configs(policies, configs, base, max_new_tokens)
    engines = make_engines(model, tokenizer, fp, rows_cfg, store_factories)
    if workload is None:
        workload = dag_workload(n_agents, questions if questions is not None else load_questions(n_requests))
    agents = workload.agents
    for eng in engines.values():
        for name, tmpl in agents:
            eng.register_agent(name, tmpl)
    acc = {label: _Acc.new() for label in engines}
    calls: list[dict[str, Any]] = []
    bar = tqdm(total=len(workload.requests) * len(engines), desc="kvcomm eval", disable=not progress)
    for r, fills in enumerate(workload.requests):
        dense = engines["dense"]
        dense.reset_answers()
        ref: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        dense_answers: dict[str, tuple[Content, list[int]]] = {}  # slot -> (dense answer, its prompt ids)
        for name, tmpl in agents:  # each agent is given the request's fills its template has slots for
            res = dense.generate(name, _own(fills, tmpl), return_logits=True, request_id=str(r))
            ref[name] = (res.token_ids, res.logits or [])
            calls.append(_call_row(r, name, "dense", res, [True], [0.0], exact_tokens, _margin(res.logits or [])))
            answer = dense.latest.get(f"agent:{name}")
            if answer is not None:
                dense_answers[f"agent:{name}"] = (answer, list(dense.last_prompt_ids))
        bar.update(1)
        for label, eng in engines.items():
            if label == "dense":
                continue
            eng.reset_answers()
            given: dict[str, Content] = {}  # --upstream exact: the dense answers, published in this engine
            for name, tmpl in agents:
                ids, logits = ref[name]
                call_fills: dict[str, Any] = _own(fills, tmpl)
                if exact_upstream:
                    call_fills.update({s: given[s] for s in tmpl.slots if s in given})
                res = eng.generate(name, call_fills, forced_ids=ids, return_logits=True, request_id=str(r),
                                   publish_answer=not exact_upstream)
                got = res.logits or []
                steps = min(len(got), len(logits))
                agree = [int(got[t].argmax()) == ids[t] for t in range(steps)]
                a = acc[label]
                a.first_agree.append(float(agree[0]))
                a.exact.append(float(all(agree[:exact_tokens])))
                a.tf_agree.append(statistics.fmean(agree))
                kls = [_kl(logits[t], got[t]) for t in range(steps)]
                a.kl_first.append(kls[0])
                a.kl_mean.append(statistics.fmean(kls))
                a.reuse.append(res.mode == "reuse")
                a.agents.append(name)
                calls.append(_call_row(r, name, label, res, agree, kls, exact_tokens, _margin(logits)))
                slot = f"agent:{name}"
                if exact_upstream and slot in dense_answers:
                    answer, context = dense_answers[slot]
                    given[slot] = eng.publish(slot, ids=list(answer.ids), kv=answer.kv, context=context)
            bar.update(1)
    bar.close()
    dense_ttft = statistics.fmean(r.ttft_ms for r in engines["dense"].records)
    dense_call_ttft = {(c["request"], c["agent"]): c["ttft_ms"] for c in calls if c["policy"] == "dense"}
    rows: list[dict[str, Any]] = []
    by_agent: list[dict[str, Any]] = []
    for label, eng in engines.items():
        recs = eng.records
        prompt = sum(x.prompt_tokens for x in recs)
        ttft = statistics.fmean(x.ttft_ms for x in recs)
        reuse_recs = [x for x in recs if x.mode == "reuse"]
        a = acc[label]
        row = {
            "policy": label,
            "calls": len(recs),
            "call_reuse_pct": 100.0 * len(reuse_recs) / max(1, len(recs)),
            "token_reuse_pct": 100.0 * sum(x.reused_tokens for x in recs) / max(1, prompt),
            "first_token_agree_pct": 100.0 * statistics.fmean(a.first_agree) if a.first_agree else 100.0,
            f"exact_{exact_tokens}_pct": 100.0 * statistics.fmean(a.exact) if a.exact else 100.0,
            "tf_token_agree_pct": 100.0 * statistics.fmean(a.tf_agree) if a.tf_agree else 100.0,
            "kl_first": statistics.fmean(a.kl_first) if a.kl_first else 0.0,
            "kl_mean": statistics.fmean(a.kl_mean) if a.kl_mean else 0.0,
            "first_token_agree_reuse_pct": _pct_mean(a.on_reuse(a.first_agree)),
            "kl_first_reuse": statistics.fmean(a.on_reuse(a.kl_first)) if any(a.reuse) else None,
            "ttft_ms": ttft,
            "ttft_reuse_calls_ms": statistics.fmean(x.ttft_ms for x in reuse_recs) if reuse_recs else None,
            "ttft_ratio_vs_dense": dense_ttft / ttft if ttft else 0.0,
        }
        row.update(_reuse_call_figures(label, calls, dense_call_ttft, resamples, seed))
        rows.append(row)
        if label != "dense":
            by_agent.extend(_agent_rows(label, acc[label]))
    sweep = fallback_sweep(calls, "kvcomm") if "kvcomm" in engines else None
    paired = paired_figures(calls, list(engines), exact_tokens=exact_tokens, resamples=resamples, seed=seed)
    in_pair = {(r, a) for r, a in paired["calls"]}
    for c in calls:
        c["paired"] = (c["request"], c["agent"]) in in_pair
    return {
        "workload": workload.name,
        "upstream": upstream,
        "requests": len(workload.requests),
        "agents": [n for n, _ in agents],
        "max_new_tokens": max_new_tokens,
        "exact_tokens": exact_tokens,
        "rows": rows,
        "by_agent": by_agent,
        "paired": paired,
        "fallback_sweep": sweep,
        "calls": calls,
    }


def _own(fills: dict[str, str], template: Template) -> dict[str, Any]:
    """The fills ``template`` has slots for (a workload's request fills every agent's input slots)."""
    return {slot: value for slot, value in fills.items() if slot in template.slots}


def _call_row(request: int, agent: str, label: str, res: Any, agree: list[bool], kls: list[float],
              exact_tokens: int, dense_margin: float) -> dict[str, Any]:
    """One call of one row: how it was served, how close its logits were to dense's, what it cost
    (``dense_margin``: :func:`_margin` of dense's first token in the same call; ``margin``: the
    same of this row's own first token, what ``fallback_margin`` compares; ``fallback``: planned
    as reuse, prefilled in full; the TTFT split into planning + fetching, moving + correcting and
    the first-token forward)."""
    rec = res.record
    return {
        "request": request, "agent": agent, "policy": label, "mode": res.mode, "slots": dict(rec.slots),
        "first_token_agree": bool(agree[0]), "exact": all(agree[:exact_tokens]),
        "tf_agree": statistics.fmean(agree), "kl_first": kls[0], "kl_mean": statistics.fmean(kls),
        "dense_margin": dense_margin, "margin": _margin(res.logits or []), "fallback": rec.fallback,
        "ttft_ms": rec.ttft_ms, "fetch_ms": rec.fetch_ms, "correct_ms": rec.correct_ms,
        "first_token_ms": rec.first_token_ms, "prompt_tokens": rec.prompt_tokens,
        "reused_tokens": rec.reused_tokens,
        "recomputed_tokens": rec.recomputed_tokens,
    }


def _reuse_call_figures(label: str, calls: list[dict[str, Any]], dense_ttft: dict[tuple[int, str], float],
                        resamples: int, seed: int) -> dict[str, Any]:
    """Over the calls this row served in reuse mode: their count, the first-token agreement's
    bootstrap interval, dense's TTFT of the same calls and the speed-up (what ``--plot`` draws)."""
    mine = [c for c in calls if c["policy"] == label and c["mode"] == "reuse"]
    if not mine:
        return {"reuse_calls": 0, "first_token_agree_reuse_pct_ci": None, "dense_ttft_reuse_calls_ms": None,
                "speedup_reuse_calls": None}
    ci = bootstrap_ci([100.0 * c["first_token_agree"] for c in mine], resamples=resamples, seed=seed)
    dense = statistics.fmean(dense_ttft[(c["request"], c["agent"])] for c in mine)
    return {"reuse_calls": len(mine), "first_token_agree_reuse_pct_ci": list(ci) if ci else None,
            "dense_ttft_reuse_calls_ms": dense,
            "speedup_reuse_calls": dense / statistics.fmean(c["ttft_ms"] for c in mine)}


def _agent_rows(label: str, a: _Acc) -> list[dict[str, Any]]:
    """Per agent: reuse-mode calls and, over them, first-token agreement with dense."""
    out = []
    for name in dict.fromkeys(a.agents):
        mine = [i for i, n in enumerate(a.agents) if n == name]
        reused = [i for i in mine if a.reuse[i]]
        out.append({
            "policy": label, "agent": name, "calls": len(mine), "reuse_calls": len(reused),
            "first_token_agree_reuse_pct": _pct_mean([a.first_agree[i] for i in reused]),
            "kl_first_reuse": statistics.fmean(a.kl_first[i] for i in reused) if reused else None,
        })
    return out
