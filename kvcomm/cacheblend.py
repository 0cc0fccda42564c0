"""Selective recompute: after the KV is assembled, recompute some reused tokens for real.

The selected tokens, plus the last prompt token, run through the full model over the reused
KV of the others, with an explicit position-aware mask. Selections:

- CacheBlend's (:func:`deviation_selection`): the real layer-1 values of the whole prompt are
  computed (a forward stopped after layer 1, 2/L of a prefill) and compared with the reused
  ones; the top ``ratio`` of reused tokens by L2 deviation;
- spans (:func:`span_selection`): EPIC's first k tokens of every moved piece, the query;
- by deviation (:func:`deviation_boundary_selection`): as many tokens per moved piece, where the
  anchors' correction was largest.

:func:`recompute_selection` combines them as a policy's :class:`~kvcomm.policies.Recompute` asks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from kvcomm.kv import KVBlock, cache_from_block, forward_over
from kvcomm.reuse import layer_deviation

if TYPE_CHECKING:
    from kvcomm.policies import Recompute


class _Stop(Exception):
    pass


@torch.inference_mode()
def real_values_at_layer(model: Any, ids: list[int], layer: int = 1) -> torch.Tensor:
    """Values [H, T, D] of ``layer`` for a full prompt, running only layers 0..layer."""
    cache = DynamicCache(config=model.config)

    def stop(*_: Any) -> None:
        raise _Stop

    handle = model.model.layers[layer].register_forward_hook(stop)
    try:
        forward_over(model, cache, input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    return cache.layers[layer].values[0]


def deviation_selection(model: Any, ids: list[int], block: KVBlock, exact_prefix: int, ratio: float) -> torch.Tensor:
    """CacheBlend's choice: the ``ratio`` of reused tokens whose layer-1 values deviate most.

    Positions (sorted, < P-1) among ids[exact_prefix:-1]; a 2-layer forward over the prompt.
    """
    P = len(ids)
    n_reused = P - 1 - exact_prefix
    k = min(n_reused, math.ceil(ratio * n_reused)) if n_reused > 0 else 0
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=block.k.device)
    layer = 1 if block.k.shape[0] > 1 else 0
    dev_tok = layer_deviation(block.v[layer], real_values_at_layer(model, ids[:-1], layer))
    dev_tok[:exact_prefix] = -1.0  # the fixed prefix is exact, never worth recomputing
    return torch.topk(dev_tok, k).indices.sort().values


def span_selection(spans: list[tuple[int, int]], limit: int, device: torch.device) -> torch.Tensor:
    """Every position of the ``[start, end)`` spans below ``limit``, sorted and unique."""
    marks = torch.zeros(limit, dtype=torch.bool, device=device)
    for start, end in spans:
        marks[max(0, start) : min(limit, end)] = True
    return marks.nonzero().flatten()


def deviation_boundary_selection(pieces: list[tuple[int, int]], deviation: torch.Tensor, k: int,
                                 keep_first: int = 1) -> torch.Tensor:
    """``k`` tokens per piece ``[start, end)``: each piece's first ``keep_first``, and the rest of
    the budget where ``deviation`` (per position, -1 where a token was moved without a correction)
    is largest, anywhere in the pieces. A piece with no corrected token gets its first ``k``
    (EPIC's rule: nothing says where its deviation sits).

    The same number of tokens as the first ``k`` of every piece. The anchors' correction is the
    deviation they estimate, and it is largest where a prefill's KV differs most from the moved
    one: mostly a piece's first tokens, but not only, and not as many in every piece. A piece's
    first token is kept whatever its correction: it takes the attention a sink would, and a budget
    spent on a few heavily corrected pieces would otherwise leave the others' first tokens out.
    """
    device = deviation.device
    forced: list[tuple[int, int]] = []
    candidates = torch.zeros(deviation.shape[0], dtype=torch.bool, device=device)
    for start, end in pieces:
        if end <= start:
            continue
        if bool((deviation[start:end] < 0).all()):
            forced.append((start, min(end, start + k)))
        else:
            first = min(end, start + min(k, keep_first))
            forced.append((start, first))
            candidates[first:end] = deviation[first:end] >= 0
    chosen = span_selection(forced, deviation.shape[0], device)
    budget = k * sum(1 for start, end in pieces if end > start) - int(chosen.numel())
    positions = candidates.nonzero().flatten()
    if budget > 0 and positions.numel() > 0:
        top = torch.topk(deviation[positions], min(budget, int(positions.numel()))).indices
        chosen = torch.cat([chosen, positions[top]])
    return chosen.unique(sorted=True)


def query_start(last: int, seg_starts: list[int], slot_starts: list[int], query_tokens: int) -> int:
    """Where the query recompute starts in a prompt whose last token is at ``last``: the template's
    tail (the segment after the last slot), reaching back to at least ``query_tokens`` before the
    answer, but not before the first slot (the fixed prefix before it is exact)."""
    floor = slot_starts[0] if slot_starts else seg_starts[-1]
    return max(floor, min(seg_starts[-1], last - query_tokens))


def recompute_selection(want: Recompute, model: Any, ids: list[int], block: KVBlock, fixed: int,
                        seg_starts: list[int], slot_starts: list[int], deviation: torch.Tensor | None = None,
                        served: int = 0) -> torch.Tensor:
    """The reused positions (< P-1) a reuse call recomputes besides the last token, as ``want``
    (its policy's :class:`~kvcomm.policies.Recompute`) asks.

    ``ids``: the prompt, its fixed prefix the first ``fixed`` tokens, its slot contents starting
    at ``slot_starts`` and the template segments after them at ``seg_starts[1:]``; ``block``: its
    assembled KV. ``deviation``: the per-token key correction norms ``assemble`` reported (the
    boundary recompute by deviation spends its tokens there; without them, as for a piece moved
    without a correction, the first tokens); ``served``: the positions before it are exact (a
    continued call's prefix), no piece there is a boundary to recompute.
    """
    last = len(ids) - 1
    parts = [deviation_selection(model, ids, block, fixed, want.ratio)]
    spans: list[tuple[int, int]] = []
    query_from = last
    if want.query:
        query_from = query_start(last, seg_starts, slot_starts, want.query_tokens)
        spans.append((query_from, last))
    if want.boundary > 0:  # the moved pieces: each slot content and/or the segment after it
        starts = {"all": (*slot_starts, *seg_starts[1:]), "segments": seg_starts[1:],
                  "contents": slot_starts}[want.boundary_at]
        if want.boundary_by == "deviation" and deviation is not None:
            # as many tokens, where the correction was largest (before the query's)
            bounds = sorted({*slot_starts, *seg_starts[1:], query_from})
            ends = dict(zip(bounds, [*bounds[1:], query_from], strict=True))
            pieces = [(s, min(ends[s], query_from)) for s in sorted(set(starts)) if served <= s < query_from]
            parts.append(deviation_boundary_selection(pieces, deviation, want.boundary, want.keep_first))
        else:
            spans += [(start, start + want.boundary) for start in starts]
    parts.append(span_selection(spans, last, block.k.device))
    return torch.cat(parts).unique(sorted=True)


@torch.inference_mode()
def selective_recompute(
    model: Any, ids: list[int], block: KVBlock, selected: torch.Tensor
) -> tuple[torch.Tensor, Any, int]:
    """Recompute the tokens ``selected`` (sorted positions < P-1) of ``block`` (covering ids[:-1])
    and the last token, each attending to the reused KV of the others before it.

    Returns (last logits, cache, number of recomputed tokens). The returned cache holds every
    prompt token in prompt order (the recomputed ones are moved back to their positions), so the
    answer's KV, the recorded deltas and ``return_cache`` read it like a prefill's.
    """
    P = len(ids)
    dev = block.k.device
    keep = torch.ones(P - 1, dtype=torch.bool, device=dev)
    keep[selected] = False
    kept_pos = torch.arange(P - 1, device=dev)[keep]
    query_pos = torch.cat([selected.to(dev), torch.tensor([P - 1], device=dev)])
    cache = cache_from_block(KVBlock(block.k[:, :, keep], block.v[:, :, keep]), model.config)
    # query i sees kept tokens before it and recomputed tokens up to itself
    kv_pos = torch.cat([kept_pos, query_pos])
    allowed = kv_pos.unsqueeze(0) <= query_pos.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=model.dtype, device=dev)
    mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)
    logits, cache = forward_over(
        model,
        cache,
        input_ids=torch.tensor([[ids[i] for i in query_pos.tolist()]], device=dev),
        position_ids=query_pos.unsqueeze(0),
        attention_mask=mask[None, None],
        use_cache=True,
        logits_to_keep=1,
    )
    # the forward appended the recomputed tokens after the kept ones: put them back in prompt order
    # (attention does not care, but everything that slices the cache by position does)
    order = torch.argsort(kv_pos)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(2, order)
        layer.values = layer.values.index_select(2, order)
    return logits[0, -1].float(), cache, int(query_pos.numel())
