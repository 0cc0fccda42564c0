"""What the example pipelines share: command-line options, engines per policy, the run directory.

Each example runs its LangGraph pipeline once per policy (``--policy dense,kvcomm``), each
policy on an engine of its own over a store of its own (``--store``; one namespace per example
and policy, so a dense run never fills the store a kvcomm run admits anchors from), and writes
every engine call record to ``<run-dir>/records.jsonl`` for ``kvcomm report``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvcomm import KVCommConfig, KVCommEngine
from kvcomm.config import POLICIES
from kvcomm.metrics import format_table, summarize, write_jsonl

_SPLIT = re.compile(r",\s*(?=[a-z][a-z0-9+.\-]*://)")


def parser(example: str, description: str, *, n: int, max_new_tokens: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{example}.py", description=description)
    p.add_argument("--n", type=int, default=n, help="number of problems (default %(default)s)")
    p.add_argument("--policy", default="dense,kvcomm",
                   help=f"comma-separated policies to run, of {', '.join(POLICIES)} (default %(default)s)")
    p.add_argument("--store", default="memory://", help="store URL, e.g. memory:// or redis://host:6379/0")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens per agent call")
    p.add_argument("--model", default="smollm2-135m", help="model short name, HF directory or .gguf file")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default %(default)s)")
    p.add_argument("--run-dir", default=None, help=f"where records go (default runs/{example}-<timestamp>)")
    return p


def policies(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in POLICIES]
    if bad or not out:
        raise SystemExit(f"error: --policy {text!r}: each policy must be one of {', '.join(POLICIES)}")
    return out


def run_dir(example: str, given: str | None) -> Path:
    path = Path(given) if given else Path("runs") / f"{example}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def with_namespace(url: str, namespace: str) -> str:
    """``url`` (or each URL of a tiered ``a://,b://``) with ``namespace`` appended to its own."""
    parts = []
    for one in _SPLIT.split(url):
        u = urlsplit(one)
        query = dict(parse_qsl(u.query, keep_blank_values=True))
        base = query.pop("namespace", query.pop("prefix", ""))
        query["namespace"] = f"{base}-{namespace}" if base else namespace
        parts.append(urlunsplit((u.scheme, u.netloc, u.path, urlencode(query), u.fragment)))
    return ",".join(parts)


def make_engine(loaded: Any, policy: str, store_url: str, example: str, max_new_tokens: int) -> KVCommEngine:
    from kvcomm.store import from_url

    store = from_url(with_namespace(store_url, f"{example}-{policy}"))
    config = KVCommConfig.from_env(policy=policy, max_new_tokens=max_new_tokens)  # other knobs: KVCOMM_*
    return KVCommEngine(loaded.model, loaded.tokenizer, store=store, config=config, fingerprint=loaded.fingerprint)


def load(args: argparse.Namespace) -> Any:
    from kvcomm.models import load_model

    print(f"loading {args.model} ...", flush=True)
    return load_model(args.model, device=args.device, progress=False)  # the pipeline draws its own bars


def save(engine: KVCommEngine, out: Path, policy: str) -> None:
    """Append the engine's call records to ``records.jsonl`` and its store stats to ``store_stats.json``."""
    write_jsonl(engine.records, out / "records.jsonl")
    stats_path = out / "store_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats[policy] = engine.store.stats()
    stats_path.write_text(json.dumps(stats, indent=2, default=str))


def print_summary(engines: dict[str, KVCommEngine], scores: dict[str, Sequence[bool]], metric: str,
                  out: Path, answers: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Print score, agreement with dense and reuse per policy; write ``summary.json``; return it.

    "same as dense %" counts the items whose every agent answer equals the dense run's. Where a
    dense run is there too, each reuse-mode call is set beside the dense run's call of the same
    item and agent (both runs make their calls in one order): the TTFT of those calls in both,
    and the ratio, is the speed-up reuse brings where it happens.
    """
    rows = []
    dense = (answers or {}).get("dense")
    dense_records = engines["dense"].records if "dense" in engines else None
    for policy, eng in engines.items():
        total = summarize(eng.records, by="policy")[0]
        ok = scores[policy]
        row = {"name": policy, "problems": len(ok), metric: sum(ok) / max(1, len(ok)),
               "reuse_calls_pct": total["reuse_calls_pct"], "reused_tokens_pct": total["reused_tokens_pct"],
               "ttft_mean_ms": total["ttft_mean_ms"]}
        if dense_records is not None and policy != "dense":
            pairs = [(d, r) for d, r in zip(dense_records, eng.records, strict=True) if r.mode == "reuse"]
            if any(d.agent != r.agent for d, r in pairs):
                raise RuntimeError("dense and reuse runs made their calls in different orders")
            if pairs:
                row["reuse_ttft_ms"] = sum(r.ttft_ms for _, r in pairs) / len(pairs)
                row["dense_ttft_ms"] = sum(d.ttft_ms for d, _ in pairs) / len(pairs)
                row["speedup"] = row["dense_ttft_ms"] / row["reuse_ttft_ms"]
        if dense is not None and answers is not None:
            same = [a == d for a, d in zip(answers[policy], dense, strict=True)]
            row["same_as_dense_pct"] = 100.0 * sum(same) / max(1, len(same))
        rows.append(row)
    print(format_table(rows, [("name", "policy", "s"), ("problems", "n", "d"), (metric, metric, ".3f"),
                              ("same_as_dense_pct", "same as dense %", ".1f"),
                              ("reuse_calls_pct", "reuse calls %", ".1f"),
                              ("reused_tokens_pct", "tokens reused %", ".1f"),
                              ("ttft_mean_ms", "TTFT mean ms", ".1f"),
                              ("dense_ttft_ms", "reuse calls: dense TTFT ms", ".1f"),
                              ("reuse_ttft_ms", "reuse TTFT ms", ".1f"), ("speedup", "speed-up", ".2f")]))
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"\nrecords: {out / 'records.jsonl'}   report: kvcomm report --run-dir {out}")
    return {"rows": rows}


def run(args: argparse.Namespace, example: str, graph: Any, items: Sequence[Any],
        to_state: Callable[[Any], dict[str, Any]], score: Callable[[Any, dict[str, Any]], bool],
        metric: str, loaded: Any = None) -> dict[str, Any]:
    """Run ``graph`` over ``items`` once per policy (one engine each, passed as the run's
    context); score each final state; save the records; print and return the summary."""
    from tqdm import tqdm

    out = run_dir(example, args.run_dir)
    loaded = loaded or load(args)
    engines, scores, answers = {}, {}, {}
    outputs: list[dict[str, Any]] = []
    for policy in policies(args.policy):
        eng = engines[policy] = make_engine(loaded, policy, args.store, example, args.max_new_tokens)
        ok: list[bool] = []
        scores[policy], answers[policy] = ok, []
        bar = tqdm(items, desc=f"{policy:>10}", unit="item")
        for i, item in enumerate(bar):
            eng.reset_answers()
            state = graph.invoke(to_state(item), context=eng)
            ok.append(bool(score(item, state)))
            final = {k: v for k, v in state.items() if k.endswith("_answer") or k == "code"}
            answers[policy].append(final)
            outputs.append({"policy": policy, "item": i, "ok": ok[-1], **final})
            bar.set_postfix({metric: f"{sum(ok) / len(ok):.2f}"})
        save(eng, out, policy)
    with (out / "outputs.jsonl").open("a") as f:
        f.writelines(json.dumps(o) + "\n" for o in outputs)
    summary = print_summary(engines, scores, metric, out, answers)
    summary["run_dir"] = str(out)
    return summary
