"""``kvcomm demo``: a four-agent pipeline run twice, full prefill vs kvcomm, side by side.

Every agent reads the user question and every earlier agent's answer behind its own system
prompt (a fully connected DAG). The first requests have no anchors yet, so kvcomm prefills them
in full and records how each agent's context shifts the shared KV; later requests reuse.
"""

from __future__ import annotations

import statistics
from typing import Any

from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.metrics import format_table
from kvcomm.template import Template

ROLES = [
    ("researcher", "You are a researcher. State the key facts needed to answer, in two sentences."),
    ("analyst", "You are an analyst. Reason step by step from the facts to an answer."),
    ("critic", "You are a critic. Point out one weakness of the reasoning, briefly."),
    ("writer", "You are a writer. Give the final answer in one clear sentence."),
]
QUESTIONS = [  # longest first: an anchor must be at least as long as the content it stands for
    "Why do we have seasons on Earth, and why are they reversed in the southern hemisphere?",
    "Why do ships made of steel float on water while a steel nail sinks to the bottom?",
    "Why is the sky blue during the day but red and orange at sunset?",
    "How does a refrigerator keep food cold, and where does the heat go?",
    "What is the capital of France, and which river flows through it?",
    "What makes a prime number special, and is 91 a prime number?",
]


def demo_templates() -> list[tuple[str, Template]]:
    out = []
    for k, (name, system) in enumerate(ROLES):
        user = "Question: {question}\n"
        user += "".join(f"\n{prev.capitalize()}: {{agent:{prev}}}\n" for prev, _ in ROLES[:k])
        user += "\nYour turn."
        out.append((name, Template.from_system_user(system, user)))
    return out


def run_demo(model: Any, tokenizer: Any, *, fingerprint: str, n_requests: int = 6, max_new_tokens: int = 24,
             store: Any = None, config: KVCommConfig | None = None, echo: Any = print) -> dict[str, Any]:
    """Run the pipeline with ``dense`` and ``kvcomm``; returns per-call rows and both engines' records.

    ``config`` is both engines' config (default: the defaults), with their policy and
    ``max_new_tokens``; ``store`` is the kvcomm engine's (default: its in-process memory store).
    """
    base = config or KVCommConfig()
    engines = {
        policy: KVCommEngine(model, tokenizer, fingerprint=fingerprint, store=store if policy == "kvcomm" else None,
                             config=base.replace(policy=policy, max_new_tokens=max_new_tokens))
        for policy in ("dense", "kvcomm")
    }
    agents = demo_templates()
    for eng in engines.values():
        for name, tmpl in agents:
            eng.register_agent(name, tmpl)
    rows = []
    for r, question in enumerate(QUESTIONS[:n_requests]):
        echo(f"request {r + 1}/{n_requests}: {question}")
        for eng in engines.values():
            eng.reset_answers()
        for name, _ in agents:
            d = engines["dense"].generate(name, {"question": question}, request_id=str(r))
            k = engines["kvcomm"].generate(name, {"question": question}, request_id=str(r))
            rows.append({
                "request": r + 1, "agent": name, "prompt": k.record.prompt_tokens, "mode": k.mode,
                "reused": k.record.reused_tokens, "dense_ms": d.ttft_ms, "kvcomm_ms": k.ttft_ms,
                "speedup": d.ttft_ms / k.ttft_ms if k.ttft_ms else 0.0,
                "same_first": "yes" if d.token_ids[:1] == k.token_ids[:1] else "no",
                "same_answer": "yes" if d.token_ids == k.token_ids else "no",
            })
        echo(f"  writer (kvcomm): {k.text.strip()[:160]}")
    return {"rows": rows, "records": {p: e.records for p, e in engines.items()}}


CALL_COLUMNS = [
    ("request", "req", "d"), ("agent", "agent", ""), ("prompt", "kvcomm prompt tok", "d"), ("mode", "kvcomm mode", ""),
    ("reused", "reused tok", "d"), ("dense_ms", "dense TTFT ms", ".1f"), ("kvcomm_ms", "kvcomm TTFT ms", ".1f"),
    ("speedup", "speedup", ".2f"), ("same_first", "same 1st tok", ""), ("same_answer", "same answer", ""),
]


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    reuse_rows = [x for x in rows if x["mode"] == "reuse"]
    lines = [format_table(rows, CALL_COLUMNS),
             "(each policy runs its own pipeline: once an upstream answer differs, later prompts differ too; "
             "`kvcomm eval` compares policies on the same upstream answers)"]
    if reuse_rows:
        lines.append("")
        lines.append(
            f"reuse calls: {len(reuse_rows)}/{len(rows)}; on them TTFT {statistics.fmean(x['dense_ms'] for x in reuse_rows):.1f} ms "
            f"(dense) -> {statistics.fmean(x['kvcomm_ms'] for x in reuse_rows):.1f} ms (kvcomm), "
            f"same first token {sum(x['same_first'] == 'yes' for x in reuse_rows)}/{len(reuse_rows)}"
        )
    return "\n".join(lines)
