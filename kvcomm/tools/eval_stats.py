"""Paired fidelity figures with bootstrap intervals, over ``kvcomm eval``'s per-call rows.

Each policy row of an eval serves its own calls in its own modes, so figures over "the calls a
row served from reused KV" compare different call sets. The paired figures take one call set,
the calls a *reference* row (``kvcomm``) served in reuse mode, and measure every row on exactly
those calls. Intervals are percentile bootstrap intervals over calls: the same resampled index
sets for every row (a paired bootstrap), so differences between rows get intervals too.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

# (per-call key, figure key, scale): the fidelity figures, each a mean over calls
FIGURES = [
    ("first_token_agree", "first_token_agree_pct", 100.0),
    ("exact", "exact_pct", 100.0),  # renamed exact_<N>_pct by paired_figures
    ("tf_agree", "tf_token_agree_pct", 100.0),
    ("kl_first", "kl_first", 1.0),
    ("kl_mean", "kl_mean", 1.0),
]
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def bootstrap_ci(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile bootstrap interval of the mean of ``values`` (None for no values)."""
    out = bootstrap_means({"x": list(values)}, resamples=resamples, seed=seed, level=level)
    return out["x"]


def bootstrap_means(series: dict[str, list[float]], *, resamples: int = RESAMPLES, seed: int = SEED,
                    level: float = LEVEL) -> dict[str, tuple[float, float] | None]:
    """Each series' percentile bootstrap interval of its mean, all from the same resampled indices
    (a paired bootstrap: the series must have one length, one value per call or request)."""
    import numpy as np

    lengths = {len(v) for v in series.values()}
    if len(lengths) > 1:
        raise ValueError(f"paired series of different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    if n == 0:
        return dict.fromkeys(series)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, tuple[float, float] | None] = {}
    for key, values in series.items():
        means = np.asarray(values, dtype=np.float64)[idx].mean(axis=1)
        a, b = np.percentile(means, [lo, hi])
        out[key] = (float(a), float(b))
    return out


def reference_row(labels: Sequence[str]) -> str | None:
    """The row whose reuse calls the paired figures use: ``kvcomm``, else the first non-dense row."""
    if "kvcomm" in labels:
        return "kvcomm"
    return next((label for label in labels if label != "dense"), None)


def paired_figures(calls: list[dict[str, Any]], labels: Sequence[str], *, exact_tokens: int,
                   resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """Every row's fidelity figures (and TTFT) over the calls the reference row served in reuse mode.

    ``calls`` are :func:`kvcomm.tools.evaluation.run_eval`'s per-call rows (keys ``request``,
    ``agent``, ``policy``, ``mode``, the per-call figures and ``ttft_ms``); ``labels`` the rows in
    order. Returns the reference, the call set, and rows overall and per agent, each figure with
    ``<figure>_ci`` [low, high] and, for non-reference rows, ``<figure>_diff`` (row − reference,
    paired per call) with ``<figure>_diff_ci``.
    """
    ref = reference_row(labels)
    by_row: dict[str, dict[tuple[int, str], dict[str, Any]]] = {label: {} for label in labels}
    for c in calls:
        by_row[c["policy"]][(c["request"], c["agent"])] = c
    keys = [k for k, c in by_row[ref].items() if c["mode"] == "reuse"] if ref is not None else []
    missing = [label for label in labels if any(k not in by_row[label] for k in keys)]
    if missing:
        raise ValueError(f"rows {', '.join(missing)} lack some of the reference row's calls")
    opts = {"resamples": resamples, "seed": seed, "level": level}
    agents = list(dict.fromkeys(a for _, a in keys))
    rows, by_agent = [], []
    for label in labels:
        rows.append(_figures(label, ref, [by_row[label][k] for k in keys],
                             [by_row[ref][k] for k in keys] if ref else [],
                             [by_row["dense"][k] for k in keys] if "dense" in by_row else [], exact_tokens, opts))
        for agent in agents:
            mine = [k for k in keys if k[1] == agent]
            row = _figures(label, ref, [by_row[label][k] for k in mine], [by_row[ref][k] for k in mine] if ref else [],
                           [by_row["dense"][k] for k in mine] if "dense" in by_row else [], exact_tokens, opts)
            by_agent.append({"policy": label, "agent": agent, **{k: v for k, v in row.items() if k != "policy"}})
    basis = (f"the calls the {ref} row served in reuse mode" + ("" if ref == "kvcomm" else " (no kvcomm row)")
             if ref else "no non-dense row: nothing to pair")
    return {"reference": ref, "basis": basis, "n": len(keys), "calls": [list(k) for k in keys],
            "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "over": "calls"},
            "rows": rows, "by_agent": by_agent}


def _figures(label: str, ref: str | None, mine: list[dict[str, Any]], theirs: list[dict[str, Any]],
             dense: list[dict[str, Any]], exact_tokens: int, opts: dict[str, Any]) -> dict[str, Any]:
    series: dict[str, list[float]] = {}
    for key, fig, scale in FIGURES:
        name = fig.replace("exact_pct", f"exact_{exact_tokens}_pct")
        series[name] = [scale * float(c[key]) for c in mine]
        if ref is not None and label != ref:
            series[f"{name}_diff"] = [scale * (float(a[key]) - float(b[key])) for a, b in zip(mine, theirs, strict=True)]
    cis = bootstrap_means(series, **opts)
    out: dict[str, Any] = {"policy": label, "calls": len(mine),
                           "reuse_calls": sum(c["mode"] == "reuse" for c in mine)}
    for name, values in series.items():
        out[name] = statistics.fmean(values) if values else None
        ci = cis[name]
        out[f"{name}_ci"] = list(ci) if ci is not None else None
    ttft = statistics.fmean(c["ttft_ms"] for c in mine) if mine else None
    dense_ttft = statistics.fmean(c["ttft_ms"] for c in dense) if dense else None
    out["ttft_ms"] = ttft
    out["speedup_vs_dense"] = dense_ttft / ttft if ttft and dense_ttft else None
    return out


def with_ci(row: dict[str, Any], key: str, fmt: str) -> str:
    """``value [low, high]`` for a table cell ('' when the figure is missing)."""
    value, ci = row.get(key), row.get(f"{key}_ci")
    if value is None:
        return ""

    def num(x: float) -> str:
        text = format(x, fmt)
        return text.replace("-", "", 1) if text.startswith("-") and float(text) == 0 else text  # no "-0.0000"

    return f"{num(value)} [{num(ci[0])}, {num(ci[1])}]" if ci else num(value)


def render_paired(paired: dict[str, Any], exact_tokens: int) -> str:
    """The paired tables: every row over the reference row's reuse calls, with bootstrap intervals."""
    from kvcomm.metrics import format_table

    boot = paired["bootstrap"]
    ref = paired["reference"]
    head = (f"\npaired: every row over the same {paired['n']} calls, {paired['basis']}; "
            f"[{100 * boot['level']:g}% bootstrap interval over calls, {boot['resamples']} resamples, seed {boot['seed']}]")
    if not paired["n"]:
        why = f"the {ref} row served no call in reuse mode" if ref else "there is no row but dense"
        return head + f"\n(nothing to pair: {why})"
    figs = [("first_token_agree_pct", "1st tok = dense %", ".1f"), (f"exact_{exact_tokens}_pct", f"exact@{exact_tokens} %", ".1f"),
            ("tf_token_agree_pct", "TF agree %", ".1f"), ("kl_first", "KL 1st", ".4f"), ("kl_mean", "KL mean", ".4f")]

    def cells(row: dict[str, Any], keys: list[tuple[str, str, str]], suffix: str = "") -> dict[str, Any]:
        return {**row, **{k + suffix: with_ci(row, k + suffix, f) for k, _, f in keys}}

    text_cols = [(k, h, "") for k, h, _ in figs]
    table = format_table([cells(r, figs) for r in paired["rows"]],
                         [("policy", "policy", ""), ("calls", "calls", "d"), ("reuse_calls", "served in reuse", "d"),
                          *text_cols, ("ttft_ms", "TTFT ms", ".1f"), ("speedup_vs_dense", "dense/policy", ".2f")])
    agent_figs = [figs[0], figs[3], figs[4]]
    per_agent = format_table([cells(r, agent_figs) for r in paired["by_agent"] if r["policy"] != "dense"],
                             [("policy", "policy", ""), ("agent", "agent", ""), ("calls", "calls", "d"),
                              *[(k, h, "") for k, h, _ in agent_figs]])
    parts = [head, table, "\npaired, per agent", per_agent]
    others = [r for r in paired["rows"] if r["policy"] not in ("dense", ref)]
    if others:
        diff_heads = ["Δ 1st tok pts", f"Δ exact@{exact_tokens} pts", "Δ TF agree pts", "Δ KL 1st", "Δ KL mean"]
        diff_cols = [(k + "_diff", h, "") for (k, _, _), h in zip(figs, diff_heads, strict=True)]
        parts += [f"\npaired differences, row − {ref} on the same calls (an interval that excludes 0 is a "
                  "difference this sample supports)",
                  format_table([cells(r, figs, "_diff") for r in others], [("policy", "policy", ""), *diff_cols])]
    return "\n".join(parts)


__all__ = ["FIGURES", "bootstrap_ci", "bootstrap_means", "paired_figures", "reference_row", "render_paired", "with_ci"]


#: the fallback margins (nats) :func:`fallback_sweep` evaluates
SWEEP_MARGINS = (0.0, 0.1, 0.25, 0.5, 1.0)


def fallback_sweep(calls: list[dict[str, Any]], label: str, margins: Sequence[float] = SWEEP_MARGINS
                   ) -> list[dict[str, Any]]:
    """What ``fallback_margin=m`` would give the row ``label``, read off its per-call rows.

    A reuse call whose own first-token margin (``margin``) is under m is counted as a full
    prefill: it agrees, its KL is 0, its TTFT is its own plus dense's (the abandoned attempt, then
    the prefill; an upper bound where the fallback starts after the exact prefix, ``exact_prefix``). Every other call keeps its measured figures. Approximate where upstream answers'
    KV is each row's own (a call that fell back would publish dense's answer KV, which its
    consumers' figures do not include); rerun with ``--variant fallback_margin=m`` to measure it.
    """
    dense = {(c["request"], c["agent"]): c["ttft_ms"] for c in calls if c["policy"] == "dense"}
    mine = [c for c in calls if c["policy"] == label]
    out = []
    for m in margins:
        served = [c for c in mine if c["mode"] == "reuse" and c["margin"] >= m]
        fell = {id(c) for c in mine if c["mode"] == "reuse" and c["margin"] < m}
        agree = [1.0 if id(c) in fell else float(c["first_token_agree"]) for c in mine]
        ttft = sum(c["ttft_ms"] + (dense[(c["request"], c["agent"])] if id(c) in fell else 0.0) for c in mine)
        row: dict[str, Any] = {
            "fallback_margin": m, "call_reuse_pct": 100.0 * len(served) / max(1, len(mine)), "reuse_calls": len(served),
            "first_token_agree_reuse_pct": None, "kl_first_reuse": None, "speedup_reuse_calls": None,
            "first_token_agree_pct": 100.0 * statistics.fmean(agree) if agree else None,
            "speedup_all_calls": sum(dense[(c["request"], c["agent"])] for c in mine) / ttft if ttft else None,
        }
        if served:
            row["first_token_agree_reuse_pct"] = 100.0 * statistics.fmean(c["first_token_agree"] for c in served)
            row["kl_first_reuse"] = statistics.fmean(c["kl_first"] for c in served)
            row["speedup_reuse_calls"] = (statistics.fmean(dense[(c["request"], c["agent"])] for c in served)
                                          / statistics.fmean(c["ttft_ms"] for c in served))
        out.append(row)
    return out


SWEEP_COLUMNS = [
    ("fallback_margin", "fallback_margin", ".2f"),
    ("call_reuse_pct", "call reuse %", ".1f"),
    ("reuse_calls", "reuse calls", "d"),
    ("first_token_agree_reuse_pct", "1st tok (reuse calls) %", ".1f"),
    ("kl_first_reuse", "KL 1st (reuse calls)", ".4f"),
    ("speedup_reuse_calls", "dense/row (reuse calls)", ".2f"),
    ("first_token_agree_pct", "1st tok (all calls) %", ".1f"),
    ("speedup_all_calls", "dense/row (all calls)", ".2f"),
]
