"""The CacheBlend baseline: reuse moved KV, recompute the tokens that deviate most.

Selection follows CacheBlend: the real layer-1 values of the whole prompt are computed (a
forward stopped after layer 1, 2/L of a prefill) and compared with the reused ones; the top
``ratio`` of reused tokens by L2 deviation, plus the last prompt token, are recomputed through
the full model over the reused KV of the others, with an explicit position-aware mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import DynamicCache

from kvcomm.kv import KVBlock, cache_from_block
from kvcomm.reuse import layer_deviation


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
        model(input_ids=torch.tensor([ids], device=model.device), cache=cache, use_cache=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    return cache.layers[layer].values[0]


@torch.inference_mode()
def selective_recompute(
    model: Any, ids: list[int], block: KVBlock, exact_prefix: int, ratio: float
) -> tuple[torch.Tensor, Any, int]:
    """Recompute the most deviating tokens of ``block`` (covering ids[:-1]) and the last token.

    Returns (last logits, cache, number of recomputed tokens). The returned cache holds every
    prompt token (order in the cache does not matter: positions live in the rotated keys).
    """
    P = len(ids)
    n_reused = P - 1 - exact_prefix
    k = min(n_reused, math.ceil(ratio * n_reused)) if n_reused > 0 else 0
    dev = block.k.device
    if k > 0:
        layer = 1 if block.k.shape[0] > 1 else 0
        dev_tok = layer_deviation(block.v[layer], real_values_at_layer(model, ids[:-1], layer))
        dev_tok[:exact_prefix] = -1.0  # the fixed prefix is exact, never worth recomputing
        selected = torch.topk(dev_tok, k).indices.sort().values
    else:
        selected = torch.empty(0, dtype=torch.long, device=dev)
    keep = torch.ones(P - 1, dtype=torch.bool, device=dev)
    keep[selected] = False
    kept_pos = torch.arange(P - 1, device=dev)[keep]
    query_pos = torch.cat([selected, torch.tensor([P - 1], device=dev)])
    cache = cache_from_block(KVBlock(block.k[:, :, keep], block.v[:, :, keep]), model.config)
    # query i sees kept tokens before it and recomputed tokens up to itself
    kv_pos = torch.cat([kept_pos, query_pos])
    allowed = kv_pos.unsqueeze(0) <= query_pos.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=model.dtype, device=dev)
    mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)
    out = model(
        input_ids=torch.tensor([[ids[i] for i in query_pos.tolist()]], device=dev),
        position_ids=query_pos.unsqueeze(0),
        attention_mask=mask[None, None],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[0, -1].float(), out.cache, int(query_pos.numel())
