"""Per-call metrics records and the reuse-rate report built from them.

Every engine call yields one :class:`CallRecord`. Reuse is reported two ways (DESIGN §3.6):
the paper's call-level rate (calls in reuse mode / calls) and the token-level rate (prompt
tokens whose KV was reused / prompt tokens).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: The ``CallRecord.slots`` key of a call that continued an earlier call of its agent exactly
#: (message mode), valued ``"<exact tokens>/<prompt tokens>"``. No slot name starts with "@".
CONTINUATION_KEY = "@continuation"


@dataclass
class CallRecord:
    agent: str
    policy: str
    mode: str  # "dense" | "prefix" (after the exact fixed prefix) | "reuse" | "partial"
    prompt_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    new_tokens: int = 0
    ttft_ms: float = 0.0
    fetch_ms: float = 0.0
    correct_ms: float = 0.0  # rotate + correct (stack + weights + apply, and moving uncorrected pieces)
    stack_ms: float = 0.0  # of which: stacking anchors for the kernels (Triton path only)
    weights_ms: float = 0.0  # of which: anchor weights (CPU path; 0 where the kernels run)
    apply_ms: float = 0.0  # of which: adding the weighted deltas and rotating (CPU path)
    first_token_ms: float = 0.0  # the forward that yields the first output token
    decode_ms: float = 0.0
    publish_ms: float = 0.0  # base KV of new inputs (off the TTFT path)
    record_ms: float = 0.0  # deltas recorded after a dense call (off the TTFT path)
    anchors_matched: int = 0
    bytes_moved: int = 0
    slots: dict[str, str] = field(default_factory=dict)  # slot -> "anchor" | "shareable" | "exact" ...
    fallback: bool = False  # planned as reuse, prefilled instead (fallback_margin): mode "prefix" or "dense"
    request_id: str = ""
    timestamp: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallRecord:
        """A record from its dict; unknown keys are ignored (newer writers), missing ones raise."""
        if not isinstance(data, dict):
            raise ValueError(f"a call record is a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ValueError(f"not a call record: missing {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_REQUIRED = [f.name for f in fields(CallRecord) if f.default is MISSING and f.default_factory is MISSING]


def write_jsonl(records: Iterable[CallRecord], path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")


def read_jsonl(path: str | Path) -> list[CallRecord]:
    """The call records of a JSONL file; ValueError names the first line that is not one."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(CallRecord.from_dict(json.loads(line)))
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"line {n}: {e}") from None
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarize(records: list[CallRecord], by: str = "agent") -> list[dict[str, Any]]:
    """One row per ``by`` value (agent or policy) plus a total row."""
    groups: dict[str, list[CallRecord]] = defaultdict(list)
    for r in records:
        groups[str(getattr(r, by))].append(r)
    rows = [_row(name, rs) for name, rs in groups.items()]
    if len(groups) > 1:
        rows.append(_row("ALL", records))
    return rows


def _row(name: str, rs: list[CallRecord]) -> dict[str, Any]:
    ttft = [r.ttft_ms for r in rs]
    prompt = sum(r.prompt_tokens for r in rs)
    return {
        "name": name,
        "calls": len(rs),
        "reuse_calls_pct": 100.0 * sum(r.mode == "reuse" for r in rs) / max(1, len(rs)),
        # partial_reuse: leading slots reused, the rest prefilled (counted in reused tokens, not in reuse calls)
        "partial_calls_pct": 100.0 * sum(r.mode == "partial" for r in rs) / max(1, len(rs)),
        "reused_tokens_pct": 100.0 * sum(r.reused_tokens for r in rs) / max(1, prompt),
        "prompt_tokens": prompt,
        "reused_tokens": sum(r.reused_tokens for r in rs),
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else 0.0,
        "ttft_p50_ms": _pct(ttft, 0.5),
        "ttft_p99_ms": _pct(ttft, 0.99),
        "anchors_matched": sum(r.anchors_matched for r in rs),
    }


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table. ``columns``: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) not in (None, "") else "" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(c))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
