"""The reuse report behind ``kvcomm report``: call records in, tables (and a plot) out.

Records come from a run directory (``records.jsonl``, as the examples write it), a JSONL file, or
a store, where the engine appends one record per call to a metrics list
(:class:`kvcomm.keys.MetricsKey`, ``<model>:metrics``).
Rows are per (agent, policy) and per (slot, policy); "TTFT saved" compares an agent's mean TTFT
with the same agent's mean under the ``dense`` policy, when the records hold both.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcomm.errors import ReportError
from kvcomm.keys import is_metrics_key
from kvcomm.metrics import CallRecord, format_table, read_jsonl, summarize

AGENT_COLUMNS = [
    ("name", "agent", "s"), ("policy", "policy", "s"), ("calls", "calls", "d"),
    ("reuse_calls_pct", "reuse calls %", ".1f"), ("partial_calls_pct", "partial calls %", ".1f"),
    ("reused_tokens_pct", "tokens reused %", ".1f"), ("ttft_mean_ms", "TTFT mean ms", ".1f"), ("ttft_p50_ms", "p50", ".1f"), ("ttft_p99_ms", "p99", ".1f"),
    ("ttft_saved_ms", "saved vs dense ms", ".1f"), ("ttft_saved_pct", "saved %", ".1f"),
    ("anchors_matched", "anchors", "d"),
]
SLOT_COLUMNS = [
    ("slot", "slot", "s"), ("policy", "policy", "s"), ("calls", "calls", "d"),
    ("reuse_calls_pct", "reuse calls %", ".1f"), ("states", "states", "s"),
]


def _row(rs: list[CallRecord]) -> dict[str, Any]:
    """The summary row of records that share one agent and one policy."""
    return summarize(rs, by="agent")[0]


@dataclass
class Sources:
    records: list[CallRecord] = field(default_factory=list)
    store_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> store.stats()
    origins: list[str] = field(default_factory=list)


def load(*, run_dir: str | None = None, records: str | None = None, stores: tuple[str, ...] = ()) -> Sources:
    """Collect call records (and store stats where known) from every source given."""
    out = Sources()
    for path in (p for p in (run_dir, records) if p):
        p = Path(path)
        f = p / "records.jsonl" if p.is_dir() else p  # a run directory also holds outputs.jsonl
        if not f.is_file():
            raise ReportError(f"no call records at {path} (expected a .jsonl file or a run directory holding "
                              "records.jsonl)")
        try:
            out.records += read_jsonl(f)
        except (ValueError, TypeError) as e:
            raise ReportError(f"{f} is not a file of call records: {e}") from None
        out.origins.append(str(f))
        stats = (p if p.is_dir() else p.parent) / "store_stats.json"
        if stats.exists():
            out.store_stats.update(json.loads(stats.read_text()))
    for url in stores:
        from kvcomm.store import from_url, redact

        store = from_url(url)
        try:
            keys = [k for k in store.scan() if is_metrics_key(k)]
            for key in keys:
                out.records += [CallRecord.from_dict(r) for r in store.read_records(key)]
            out.store_stats[redact(url)] = store.stats()
            out.origins += [f"{redact(url)} {k}" for k in keys]
        finally:
            store.close()
    if not out.records:
        where = ", ".join(out.origins) or ", ".join(p for p in (run_dir, records, *stores) if p) or "nowhere"
        raise ReportError(f"no call records found in {where}")
    return out


def agent_rows(records: list[CallRecord]) -> list[dict[str, Any]]:
    """One row per (agent, policy), with TTFT saved against the same agent's dense calls."""
    groups: dict[tuple[str, str], list[CallRecord]] = defaultdict(list)
    for r in records:
        groups[(r.agent, r.policy)].append(r)
    rows = []
    for (agent, policy), rs in sorted(groups.items()):
        row = {**_row(rs), "policy": policy}
        dense = groups.get((agent, "dense"))
        if dense and policy != "dense":
            base = _row(dense)["ttft_mean_ms"]
            row["ttft_saved_ms"] = base - row["ttft_mean_ms"]
            row["ttft_saved_pct"] = 100.0 * row["ttft_saved_ms"] / base if base else 0.0
        rows.append(row)
    return rows


def policy_rows(records: list[CallRecord]) -> list[dict[str, Any]]:
    return [{**row, "policy": row["name"], "name": "ALL"} for row in summarize(records, by="policy")
            if row["name"] != "ALL"]


def slot_rows(records: list[CallRecord]) -> list[dict[str, Any]]:
    """One row per (slot, policy): calls that read the slot, how many ran in reuse mode, and the
    slot's planning states (``exact``, ``new-anchor``, ``shared(n)``) over those calls."""
    groups: dict[tuple[str, str], list[tuple[CallRecord, str]]] = defaultdict(list)
    for r in records:
        for slot, state in r.slots.items():
            groups[(slot, r.policy)].append((r, state))
    rows = []
    for (slot, policy), items in sorted(groups.items()):
        states = Counter(_state_kind(s) for _, s in items)
        rows.append({
            "slot": slot, "policy": policy, "calls": len(items),
            "reuse_calls_pct": 100.0 * sum(r.mode == "reuse" for r, _ in items) / len(items),
            "states": " ".join(f"{k}={v}" for k, v in sorted(states.items())),
            "state_counts": dict(states),
        })
    return rows


def _state_kind(state: str) -> str:
    """``shared(3)`` → ``shared`` (3 anchors usable), ``shared(0)`` → ``unshared``, a continued
    call's ``<exact tokens>/<prompt tokens>`` → ``continued``, else as is."""
    if state.startswith("shared("):
        return "unshared" if state == "shared(0)" else "shared"
    exact, _, prompt = state.partition("/")
    if exact.isdigit() and prompt.isdigit():
        return "continued"
    return state


def store_rows(stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for source, s in stats.items():
        hits, misses = int(s.get("hits", 0)), int(s.get("misses", 0))
        rows.append({"store": source, "hits": hits, "misses": misses,
                     "hit_rate_pct": 100.0 * hits / max(1, hits + misses),
                     "bytes_read": int(s.get("bytes_read", 0)), "bytes_written": int(s.get("bytes_written", 0))})
    return rows


def build(src: Sources) -> dict[str, Any]:
    return {
        "agents": agent_rows(src.records),
        "policies": policy_rows(src.records),
        "slots": slot_rows(src.records),
        "store": store_rows(src.store_stats),
        "records": len(src.records),
        "sources": src.origins,
    }


def render(report: dict[str, Any]) -> str:
    parts = [f"{report['records']} call records from {', '.join(report['sources'])}", "",
             format_table(report["agents"], AGENT_COLUMNS), "",
             format_table(report["policies"], AGENT_COLUMNS[:8] + AGENT_COLUMNS[-1:])]
    if report["slots"]:
        parts += ["", format_table(report["slots"], SLOT_COLUMNS)]
    if report["store"]:
        parts += ["", format_table(report["store"], [("store", "store", "s"), ("hits", "hits", "d"),
                                                     ("misses", "misses", "d"), ("hit_rate_pct", "hit rate %", ".1f")])]
    return "\n".join(parts)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Two panels, one bar per agent and policy: tokens reused %, and TTFT mean with p50-p99 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["agents"]
    agents = list(dict.fromkeys(r["name"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["name"], r["policy"]): r for r in rows}
    width = 0.8 / max(1, len(policies))
    fig, (ax_reuse, ax_ttft) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(agents) * 2), 4.2))
    for i, policy in enumerate(policies):
        xs = [a + (i - (len(policies) - 1) / 2) * width for a in range(len(agents))]
        got = [by.get((a, policy)) for a in agents]
        reuse = [r["reused_tokens_pct"] if r else 0.0 for r in got]
        ttft = [r["ttft_mean_ms"] if r else 0.0 for r in got]
        ax_reuse.bar(xs, reuse, width, label=policy)
        bars = ax_ttft.bar(xs, ttft, width, label=policy)
        for x, r in zip(xs, got, strict=True):
            if r:  # p50 and p99 as ticks over the mean bar
                ax_ttft.plot([x, x], [r["ttft_p50_ms"], r["ttft_p99_ms"]], color="black", lw=1)
                ax_ttft.plot([x], [r["ttft_p50_ms"]], marker="_", color="black", ms=8)
                ax_ttft.plot([x], [r["ttft_p99_ms"]], marker="^", color=bars.patches[0].get_facecolor(),
                             mec="black", ms=5)
    for ax, title, unit in ((ax_reuse, "prompt tokens reused", "%"), (ax_ttft, "time to first token (bar: mean, line: p50 to p99 ▲)", "ms")):
        ax.set_xticks(range(len(agents)), agents, rotation=20 if len(agents) > 4 else 0)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax_reuse.set_ylim(0, 100)
    fig.suptitle(f"kvcomm: reuse and TTFT per agent ({report['records']} calls)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
