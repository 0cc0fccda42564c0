"""``kvcomm eval``'s text: the table of each row on its own calls, the per-agent table, then the
paired tables (:func:`kvcomm.tools.eval_stats.render_paired`) and the fallback-margin sweep, all
read off :func:`kvcomm.tools.evaluation.run_eval`'s result.
"""

from __future__ import annotations

from typing import Any

from kvcomm.tools.eval_stats import SWEEP_COLUMNS, render_paired

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

UPSTREAM_TEXT = {
    "own": "upstream answers' KV: each policy's own producer (--upstream own, what a deployment sees)",
    "exact": "upstream answers' KV: the dense producer's, for every policy (--upstream exact: each call's own error)",
}


def render(out: dict[str, Any]) -> str:
    """``kvcomm eval``'s text: the table of each row on its own calls, per agent, then the paired tables."""
    from kvcomm.metrics import format_table

    n_exact = out["exact_tokens"]
    cols = [(k if k != "exact_32_pct" else f"exact_{n_exact}_pct", h if k != "exact_32_pct" else f"exact@{n_exact} %", f)
            for k, h, f in EVAL_COLUMNS]
    lines = [f"\n{out['requests']} requests x {len(out['agents'])} agents ({' -> '.join(out['agents'])}), "
             f"{out['max_new_tokens']} new tokens, teacher-forced on the dense answers",
             UPSTREAM_TEXT[out.get("upstream", "own")],
             format_table(out["rows"], cols),
             "\nper agent, reuse-mode calls only",
             format_table(out["by_agent"], AGENT_COLUMNS)]
    if "paired" in out:
        lines.append(render_paired(out["paired"], n_exact))
    if out.get("fallback_sweep"):
        lines += ["\nkvcomm with fallback_margin=m (a reuse call whose first token leads by less than m nats "
                  "prefilled in full), estimated from this run's per-call margins; --variant fallback_margin=m "
                  "measures one", format_table(out["fallback_sweep"], SWEEP_COLUMNS)]
    return "\n".join(lines)
