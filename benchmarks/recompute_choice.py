"""Which reused tokens are worth recomputing? A table, not a test.

Runs the DAG eval's workload (HumanEval prompts through analyst -> designer -> coder -> reviewer)
through dense and kvcomm, teacher-forced on dense's answers. At every kvcomm reuse call it takes
the corrected prompt KV the engine assembled and, over that same KV, recomputes several
selections of tokens besides the query (the template's tail and the prompt's last 16 tokens, as
``fidelity=1``), then compares each one's first-token distribution with dense's:

- ``first k``: the first k tokens of every moved piece (EPIC's rule, ``recompute_boundary_by=first``);
- ``deviation k``: k per moved piece, the tokens whose keys the correction moved most (the
  per-token norms ``assemble`` reports; ``recompute_boundary_by=deviation`` at k=4);
- ``deviation(K+V) k``: the same, keys' and values' corrections summed;
- ``residual k`` (an oracle: needs the prompt's real KV, i.e. a prefill): k per piece where the
  corrected KV is furthest from the prefill's.

Each score is spent two ways: over all the moved pieces at once (k times the number of pieces,
where it is largest: ``recompute_boundary_by=deviation``), and ``per piece`` (k in every piece,
where it is largest in that piece; ``+first``: the piece's first token, then k - 1 of the rest).

With ``--depths 4,8,16,25`` it also asks whether the boundary tokens need every layer:
``first K layers<N`` recomputes the first K = max(--k) tokens of every piece through the first N
layers only (their KV from layer N on stays the corrected reused KV), which would cost N/L of
their forward. Emulated exactly: the boundary tokens are recomputed in full over the corrected
KV, their layers < N copied into it, then the query recomputed over the result (a layer's KV
depends only on the layers below it, so a forward cut after layer N - 1 writes the same KV).

It also prints how much of the real deviation the correction removes at the KV level, over the
moved pieces' tokens (before any recompute): ``removed`` = 1 - |real - corrected|^2 / |real -
moved|^2 (negative: the correction moved the KV away from the prefill's), and ``best scale`` =
<real - moved, corrected - moved> / |corrected - moved|^2, the factor on the correction that would
have removed most (1: the anchors' estimate is as large as it should be; below 1: too large).
(Both relative to the correction as applied, ``correction_scale`` times the estimate.) Then the
fit per kind of moved piece (a slot's content or the template text after it, by slot kind: an
input such as the question, or an agent's answer), pooled over the calls, as the scale on the
anchors' estimate itself: where one ``correction_scale`` is a compromise between pieces.

Usage: ``python benchmarks/recompute_choice.py --n 40`` (about 20 minutes on 2 CPU cores);
``--workload rag --n 30`` runs the RAG pipeline's three agents over their retrieved passages
instead; ``--k 4`` compares the rules at fidelity 2's budget only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from typing import Any

import torch

from kvcomm.cacheblend import query_start, selective_recompute
from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.kv import KVBlock, block_from_cache, prefill
from kvcomm.models.loading import load_model
from kvcomm.reuse import assemble
from kvcomm.template import slot_kind
from kvcomm.tools.evaluation import _kl, _own, dag_workload, load_questions, make_engines, row_configs

QUERY_TOKENS = 16


def per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[L, H, T, D]`` pair -> ``[T]``: squared L2 distance over layers 1.. (layer 0 is never corrected)."""
    return (a[1:].float() - b[1:].float()).square().sum(dim=(0, 1, 3))


def top(score: torch.Tensor, candidates: list[int], budget: int) -> list[int]:
    if not candidates or budget <= 0:
        return []
    idx = torch.topk(score[candidates], min(budget, len(candidates))).indices.tolist()
    return [candidates[i] for i in idx]


def top_per_piece(score: torch.Tensor, pieces: list[tuple[int, int]], k: int, keep_first: int = 0) -> list[int]:
    """k tokens in every piece ``[start, end)``: its first ``keep_first``, then the largest scores."""
    chosen: list[int] = []
    for start, end in pieces:
        head = list(range(start, min(end, start + keep_first)))
        chosen += head + top(score, list(range(start + len(head), end)), k - len(head))
    return chosen


class Probe:
    """Hooks on one engine: what its reuse calls assembled, and the selections compared over it."""

    def __init__(self, engine: KVCommEngine, ks: tuple[int, ...] = (1, 2, 3, 4), depths: tuple[int, ...] = ()) -> None:
        self.engine = engine
        self.ks = ks
        self.depths = depths  # boundary recomputes cut after this many layers (see the module doc)
        self.rows: list[dict[str, Any]] = []
        self.ref: torch.Tensor | None = None
        self.call: dict[str, Any] = {}
        self.kv_fit: list[dict[str, float]] = []  # per reuse call: removed / best scale, keys and values
        # per kind of piece ("content input", "text after agent"...) and K/V: [<want, got>, |got|^2, |want|^2]
        self.piece_fit: dict[str, list[float]] = {}
        fast, select = engine.fast, engine.builder.selection
        assemble_fn, recompute_fn = fast.assemble, fast.recompute

        def spy_assemble(pieces, total, inv_freq, **kw):  # type: ignore[no-untyped-def]
            out = assemble_fn(pieces, total, inv_freq, **kw)
            self.call["moved"] = assemble(pieces, total, inv_freq, engine.config, correct=False)
            self.call["corrected"] = KVBlock(out.k.clone(), out.v.clone())
            return out

        def spy_select(call, *rest):  # type: ignore[no-untyped-def]
            self.call.update(seg_starts=list(call.seg_starts), slot_starts=list(call.slot_starts),
                             seg0=len(call.prompt.segments[0]), slots=[content.slot for content in call.contents])
            return select(call, *rest)

        def spy_recompute(ids, selected):  # type: ignore[no-untyped-def]
            if self.ref is not None and "seg_starts" in self.call:
                self.rows.append(self.compare(ids))
            self.call = {}
            return recompute_fn(ids, selected)

        fast.assemble, fast.recompute = spy_assemble, spy_recompute  # type: ignore[method-assign]
        engine.builder.selection = spy_select  # type: ignore[method-assign]

    def compare(self, ids: list[int]) -> dict[str, Any]:
        assert self.ref is not None
        model, c = self.engine.model, self.call
        last = len(ids) - 1
        corrected, moved = c["corrected"], c["moved"]
        _, cache = prefill(model, ids[:-1])
        real = block_from_cache(cache)
        seg_starts, slot_starts = c["seg_starts"], c["slot_starts"]
        query_from = query_start(last, seg_starts, slot_starts, QUERY_TOKENS)
        query = list(range(query_from, last))
        starts = sorted(s for s in {*slot_starts, *seg_starts[1:]} if s < query_from)
        pieces = list(zip(starts, [*starts[1:], query_from], strict=True))
        candidates = list(range(c["seg0"], query_from))
        self.kv_fit.append(kv_fit(moved, corrected, real, c["seg0"], query_from))
        self.fit_pieces(moved, corrected, real, last)
        scores = {
            "deviation": per_token(corrected.k, moved.k),
            "deviation(K+V)": per_token(corrected.k, moved.k) + per_token(corrected.v, moved.v),
            "residual (oracle)": per_token(corrected.k, real.k) + per_token(corrected.v, real.v),
        }
        selections: dict[str, list[int]] = {"last token only (fidelity 0)": [], "query only (fidelity 1)": query}
        for k in sorted({*self.ks, 2 * max(self.ks)}):
            selections[f"first {k}"] = query + [t for s in starts for t in range(s, min(s + k, query_from))]
        for name, score in scores.items():
            for k in self.ks:
                selections[f"{name} {k}"] = query + top(score, candidates, k * len(starts))
                selections[f"{name} {k} per piece"] = query + top_per_piece(score, pieces, k)
                if k > 1:
                    selections[f"{name} {k} per piece +first"] = query + top_per_piece(score, pieces, k, 1)
        row: dict[str, Any] = {}
        for name, chosen in selections.items():
            row[name] = self.score(ids, corrected, chosen)
        k = max(self.ks)
        boundary = sorted({t for s in starts for t in range(s, min(s + k, query_from))})
        for depth, kv in shallow_boundaries(model, ids, corrected, boundary, self.depths):
            # cost as recomputed tokens: the boundary's at depth / L of a token each
            row[f"first {k} layers<{depth}"] = self.score(ids, kv, query, len(boundary) * depth / corrected.k.shape[0])
        return row

    def score(self, ids: list[int], kv: KVBlock, chosen: list[int], extra: float = 0.0) -> tuple[float, float, bool]:
        """(tokens recomputed, KL to dense's first token, same argmax) for recomputing ``chosen``
        and the last token over a copy of ``kv``; ``extra``: tokens' worth of work done before."""
        assert self.ref is not None
        sel = torch.tensor(sorted(set(chosen)), dtype=torch.long)
        logits, _, _ = selective_recompute(self.engine.model, ids, KVBlock(kv.k.clone(), kv.v.clone()), sel)
        return int(sel.numel()) + 1 + extra, _kl(self.ref, logits), int(logits.argmax()) == int(self.ref.argmax())


    def fit_pieces(self, moved: KVBlock, corrected: KVBlock, real: KVBlock, last: int) -> None:
        """Add this call's moved pieces (every token up to the last, layer 0 left out: never
        corrected) to :attr:`piece_fit`, by piece kind and slot kind."""
        c = self.call
        starts = [(s, "content", slot) for s, slot in zip(c["slot_starts"], c["slots"], strict=True)]
        starts += [(s, "text after", slot) for s, slot in zip(c["seg_starts"][1:], c["slots"], strict=True)]
        starts.sort()
        for (start, piece, slot), end in zip(starts, [s for s, _, _ in starts[1:]] + [last], strict=True):
            for name, want, got in deviations(moved, corrected, real, start, end, first_layer=1):
                sums = self.piece_fit.setdefault(f"{piece} {slot_kind(slot)} {name}", [0.0, 0.0, 0.0])
                sums[0] += float((want * got).sum())
                sums[1] += float(got.square().sum())
                sums[2] += float(want.square().sum())


def shallow_boundaries(model: Any, ids: list[int], corrected: KVBlock, boundary: list[int],
                       depths: tuple[int, ...]) -> Iterator[tuple[int, KVBlock]]:
    """For each depth N: ``corrected`` with the ``boundary`` tokens' KV of layers < N replaced by
    their recompute over ``corrected`` (what a forward of them cut after layer N - 1 writes)."""
    if not depths:
        return
    where = torch.tensor(boundary, dtype=torch.long)
    full = corrected  # no boundary tokens (a call with no moved piece): nothing to replace
    if boundary:
        _, cache, _ = selective_recompute(model, ids, KVBlock(corrected.k.clone(), corrected.v.clone()), where)
        full = block_from_cache(cache, 0, corrected.length)
    for depth in depths:
        kv = KVBlock(corrected.k.clone(), corrected.v.clone())
        kv.k[:depth, :, where] = full.k[:depth, :, where]
        kv.v[:depth, :, where] = full.v[:depth, :, where]
        yield depth, kv


def deviations(moved: KVBlock, corrected: KVBlock, real: KVBlock, start: int, end: int, first_layer: int = 0
               ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Keys, then values, over positions [start, end) from layer ``first_layer`` on, in float64:
    (name, ``want`` = real - moved: the real deviation, ``got`` = corrected - moved: the correction)."""
    for name, m, c, r in (("K", moved.k, corrected.k, real.k), ("V", moved.v, corrected.v, real.v)):
        m, c, r = (t[first_layer:, :, start:end].double() for t in (m, c, r))
        yield name, r - m, c - m


def kv_fit(moved: KVBlock, corrected: KVBlock, real: KVBlock, start: int, end: int) -> dict[str, float]:
    """How well the correction fits the real deviation over positions [start, end), keys and values."""
    fit: dict[str, float] = {}
    for name, want, got in deviations(moved, corrected, real, start, end):
        # want - got = real - corrected (float32 values: their float64 differences are exact)
        fit[f"removed {name}"] = 1.0 - float((want - got).square().sum() / want.square().sum().clamp_min(1e-30))
        fit[f"best scale {name}"] = float((want * got).sum() / got.square().sum().clamp_min(1e-30))
    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="requests (the first 4 only fill the anchor pools)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workload", choices=("dag", "rag"), default="dag",
                    help="dag: HumanEval prompts through 4 agents; rag: the RAG pipeline's agents and passages")
    ap.add_argument("--k", default="1,2,3,4", help="boundary tokens per moved piece to compare, comma-separated")
    ap.add_argument("--depths", default="",
                    help="also recompute the first max(--k) tokens of every piece through only this many layers, "
                         "comma-separated (e.g. 4,8,16,25)")
    args = ap.parse_args()
    ks = tuple(int(k) for k in args.k.split(","))
    depths = tuple(int(n) for n in args.depths.split(",") if n)
    torch.set_grad_enabled(False)
    lm = load_model(args.model, progress=False)
    tokens = 48 if args.workload == "rag" else 32  # as kvcomm eval
    engines = make_engines(lm.model, lm.tokenizer, lm.fingerprint, row_configs(["kvcomm"], None, KVCommConfig(), tokens))
    probe = Probe(engines["kvcomm"], ks, depths)
    if args.workload == "rag":
        from kvcomm.tools.rag_eval import rag_index, rag_workload

        work = rag_workload(rag_index(lm.tokenizer), args.n)
    else:
        work = dag_workload(4, load_questions(args.n))
    for eng in engines.values():
        for name, tmpl in work.agents:
            eng.register_agent(name, tmpl)
    for r, fills in enumerate(work.requests):
        dense, kv = engines["dense"], engines["kvcomm"]
        dense.reset_answers()
        kv.reset_answers()
        refs = {name: dense.generate(name, _own(fills, tmpl), return_logits=True, request_id=str(r))
                for name, tmpl in work.agents}
        for name, tmpl in work.agents:
            probe.ref = (refs[name].logits or [None])[0]
            kv.generate(name, _own(fills, tmpl), forced_ids=refs[name].token_ids, return_logits=True, request_id=str(r))
            probe.ref = None
        print(f"request {r + 1}/{args.n}: {len(probe.rows)} reuse calls compared", file=sys.stderr, flush=True)
    if not probe.rows:
        sys.exit("no reuse calls: run more requests (--n)")
    print(f"\n{len(probe.rows)} reuse calls; every selection over the same corrected KV, plus the last token\n")
    print(f"{'recomputed besides the last token':44s} {'tokens':>7s} {'1st tok = dense %':>18s} {'KL 1st':>8s}")
    for name in probe.rows[0]:
        cells = [row[name] for row in probe.rows]
        print(f"{name:44s} {statistics.fmean(c[0] for c in cells):7.1f} "
              f"{100 * statistics.fmean(c[2] for c in cells):18.1f} {statistics.fmean(c[1] for c in cells):8.4f}")
    print("\nthe correction against the real deviation, KV level, over the moved pieces (median [quartiles] over calls)")
    for name in probe.kv_fit[0]:
        q = statistics.quantiles([fit[name] for fit in probe.kv_fit], n=4) if len(probe.kv_fit) > 1 else [0.0] * 3
        below = sum(fit[name] < (0 if name.startswith("removed") else 1) for fit in probe.kv_fit)
        print(f"{name:14s} {q[1]:7.3f} [{q[0]:.3f}, {q[2]:.3f}]   below {'0' if name.startswith('removed') else '1'}: "
              f"{below} of {len(probe.kv_fit)} calls")
    # the engine applied correction_scale times the anchors' estimate: got = s * estimate
    s0 = probe.engine.config.correction_scale
    print(f"\nby kind of moved piece, pooled over the calls: the scale on the anchors' estimate that fits best, "
          f"and the share of the real deviation removed at correction_scale={s0} and at that best scale")
    print(f"{'piece (slot kind) K/V':24s} {'best scale':>10s} {'removed at ' + str(s0):>15s} {'at best':>8s}")
    for name, (num, den, want) in sorted(probe.piece_fit.items()):
        if den > 0 and want > 0:  # removed at a factor a on got: 1 - |want - a got|^2 / |want|^2
            print(f"{name:24s} {s0 * num / den:10.3f} {(2 * num - den) / want:15.3f} {num * num / (den * want):8.3f}")


if __name__ == "__main__":
    main()
