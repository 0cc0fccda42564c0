"""transformers attention functions for the fast path, registered by name for one call at a time.

- ``kvcomm_decode`` (:func:`kvcomm_decode_attention`): one query token over the static buffer,
  through :func:`kvcomm.kernels.decode_attention` where Triton runs, else SDPA.
- ``kvcomm_many`` (:func:`many_query_attention`): a few queries over a long KV buffer on the CPU
  (a selective recompute, a teacher-forced decode), reading grouped K/V heads in place and, inside
  :func:`chunked_rows`, in causal row chunks (:func:`causal_chunks`); in float32 its two matmuls
  are oneDNN's where torch has it (:data:`ONEDNN_FOLDED`).
- ``kvcomm_sdpa`` (:func:`visible_sdpa_attention`): transformers' SDPA function with the buffer-wide
  mask cut to the filled slots that an eager one-token forward hands it.

:class:`kvcomm.fastpath.static_cache.StaticPromptCache` switches a model to one of them for the
duration of a forward; anything they do not handle goes to transformers' SDPA function.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvcomm.fastpath.cpu import cpu_vendor, onednn_beats_mkl
from kvcomm.kernels.decode_attention import decode_attention
from kvcomm.kernels.dispatch import use_triton

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "kvcomm_decode"
# attention-function arguments the kernel does not implement: calls carrying them go to SDPA
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias")


def kvcomm_decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: the decode kernel for one query token, else SDPA.

    Same contract as ``transformers.integrations.sdpa_attention.sdpa_attention_forward``
    (query ``[B, Hq, q_len, D]``, key/value ``[B, Hkv, S, D]``, output ``[B, q_len, Hq, D]``).
    The kernel takes masks shared by all heads (``[B or 1, 1, 1, S]``, additive); anything else
    (prefill, bool or per-head masks, dropout, softcap, sinks, no Triton) is SDPA's. A mask over
    more slots than ``key`` has is cut to the first ones (an eager step reads the filled slots).
    """
    attention_mask = _visible_mask(attention_mask, key.shape[2])
    if _kernel_applies(query, key, attention_mask, dropout, kwargs):
        return decode_attention(query, key, value, attention_mask, scaling), None
    return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)


SDPA_IMPLEMENTATION = "kvcomm_sdpa"


def visible_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA function, its mask cut to the keys it is handed: an eager one-token
    forward of :class:`~kvcomm.fastpath.static_cache.StaticPromptCache` without the decode kernel
    reads the filled slots only, under a mask that spans the whole buffer."""
    return _sdpa(module, query, key, value, _visible_mask(attention_mask, key.shape[2]), dropout, scaling, kwargs)


def _visible_mask(mask: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """An additive 4D mask over a static buffer's slots, cut to the first ``keys`` (an eager
    forward of :class:`~kvcomm.fastpath.static_cache.StaticPromptCache` hands the attention the
    filled slots' K/V only; the mask still spans the buffer)."""
    if mask is not None and mask.dim() == 4 and mask.shape[-1] > keys:
        return mask[..., :keys]
    return mask


def _sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
          dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function: where kvcomm's own attention functions do not apply."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return out, None


def _heads_supported(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict[str, Any],
                     unsupported: tuple[str, ...] = _UNSUPPORTED_KWARGS) -> bool:
    """What both attention functions need: no dropout, none of the ``unsupported`` arguments, one
    dtype, and query heads a whole multiple of the K/V heads (GQA)."""
    if dropout or any(kwargs.get(name) is not None for name in unsupported):
        return False
    return query.dtype == key.dtype and query.shape[1] % key.shape[1] == 0


def _kernel_applies(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float,
                    kwargs: dict[str, Any]) -> bool:
    if query.shape[2] != 1 or not _heads_supported(query, key, dropout, kwargs):
        return False
    if mask is not None and not (
        mask.is_floating_point() and mask.dim() == 4 and mask.shape[0] in (1, query.shape[0])
        and mask.shape[1:] == (1, 1, key.shape[2])
    ):
        return False
    return use_triton(None, query)


MANY_ATTN_IMPLEMENTATION = "kvcomm_many"
#: torch's SDPA reads grouped K/V heads in place from 2.5 on (``enable_gqa``); transformers asks for
#: that only without a mask, and copies every K/V head out per query head (``repeat_kv``) with one
GROUPED_SDPA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """torch's oneDNN linear op (``mkldnn::_linear_pointwise``, what inductor's CPU code calls:
    ``x @ w.T`` for a 2D ``w``), or None where this torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return None
    return torch.ops.mkldnn._linear_pointwise


_LINEAR = _onednn_linear()
#: The many-query attention's float32 path: the query heads of one K/V head folded into one matrix,
#: its two matmuls oneDNN's (:func:`_onednn_folded_attention`). Where MKL's sgemm runs AVX2 code
#: on an AVX-512 CPU (AMD's), oneDNN's runs AVX-512: on a 2-core EPYC one 75 x 3,629 score matrix
#: and its output took 0.25 ms against MKL's 0.48, and a 53-row recompute over 3,629 keys 202
#: against SDPA's 224 ms. On Intel CPUs MKL runs AVX-512 too, and SDPA's kernel is the faster
#: (a 2-core Xeon: 203 against 220 ms); ``benchmarks/recompute.py`` times both. False: SDPA's
#: kernel (:data:`GROUPED_SDPA`); it turns False by itself if the op ever fails.
ONEDNN_FOLDED = _LINEAR is not None and onednn_beats_mkl(cpu_vendor(), torch.backends.mkl.is_available())
#: ... over this many keys or more: below, its few more small ops per K/V head cost more than its
#: faster matmuls save
ONEDNN_MIN_KEYS = 1024

#: A query chunk's fixed cost in query x key products, for :func:`causal_chunks`: one more chunk
#: is a few more small ops per layer (about 75 us on 2 cores), one product of a 9-head, 64-dim
#: model about 20 ns. The oneDNN path costs about 4 times more small ops per chunk (two matmuls,
#: a softmax and a copy per K/V head) at a third of the time per product.
CHUNK_OVERHEAD = 4096
FOLDED_CHUNK_OVERHEAD = 16384


def _onednn_applies(dtype: torch.dtype, keys: int) -> bool:
    """Whether attention in ``dtype`` over ``keys`` keys goes through the oneDNN path."""
    return ONEDNN_FOLDED and dtype == torch.float32 and keys >= ONEDNN_MIN_KEYS


def chunk_overhead(dtype: torch.dtype, keys: int) -> int:
    """:func:`causal_chunks`'s ``overhead`` for a CPU recompute in ``dtype`` over ``keys`` slots:
    the oneDNN path's (:data:`FOLDED_CHUNK_OVERHEAD`) where it runs, else SDPA's (:data:`CHUNK_OVERHEAD`)."""
    return FOLDED_CHUNK_OVERHEAD if _onednn_applies(dtype, keys) else CHUNK_OVERHEAD


# the row chunks of the selective recompute in progress and its rows' positions (set by
# StaticPromptCache.recompute through chunked_rows)
_QUERY_ROWS: contextvars.ContextVar[tuple[tuple[tuple[int, int, int], ...] | None, list[int] | None]] = (
    contextvars.ContextVar("kvcomm_query_rows", default=(None, None)))


def causal_chunks(positions: list[int], overhead: int = -1, max_cuts: int = 64) -> tuple[tuple[int, int, int], ...]:
    """Group sorted query positions into row chunks ``(first, end, keys)``: rows [first, end) read
    keys [0, keys) only, ``keys`` being one past the chunk's last position.

    A recomputed token sees the positions up to its own, so a chunk of early tokens (the first
    tokens of a piece halfway into the prompt) need not read the keys after it: every one of them
    is masked for all its rows. Chunks are cut where positions jump (a run of consecutive ones
    stays whole), at the cuts that minimise the query x key products plus ``overhead`` per chunk
    (default :data:`CHUNK_OVERHEAD`); at most ``max_cuts`` candidate cuts, spread evenly.
    """
    overhead = CHUNK_OVERHEAD if overhead < 0 else overhead
    q = len(positions)
    cuts = [i for i in range(1, q) if positions[i] > positions[i - 1] + 1]
    if len(cuts) > max_cuts:
        cuts = [cuts[round(j * len(cuts) / max_cuts)] for j in range(max_cuts)]
    bounds = [0, *cuts, q]
    best = [0.0] + [float("inf")] * (len(bounds) - 1)  # best[j]: least cost of rows [0, bounds[j])
    back = [0] * len(bounds)
    for j in range(1, len(bounds)):
        keys = positions[bounds[j] - 1] + 1
        for i in range(j):
            cost = best[i] + (bounds[j] - bounds[i]) * keys + overhead
            if cost < best[j]:
                best[j], back[j] = cost, i
    chunks, j = [], len(bounds) - 1
    while j > 0:
        i = back[j]
        chunks.append((bounds[i], bounds[j], positions[bounds[j] - 1] + 1))
        j = i
    return tuple(reversed(chunks))


def many_query_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function for a selective recompute on the CPU: a few queries over
    a long KV buffer, else SDPA.

    transformers hands SDPA this shape (tens of queries, thousands of keys, a float mask) after
    copying every grouped K/V head out once per query head (``repeat_kv``). Here, in float32 over
    :data:`ONEDNN_MIN_KEYS` keys or more, the query heads of one K/V head are folded into one
    matrix and its scores and output are two oneDNN matmuls (:func:`_onednn_folded_attention`);
    otherwise torch's SDPA reads the grouped heads in place (``enable_gqa``, torch >= 2.5), and
    before that the folded matrix goes through two batched torch matmuls and a softmax. During
    :meth:`StaticPromptCache.recompute` the rows go in chunks (:func:`causal_chunks`), each reading
    only the keys its tokens can see. ``benchmarks/recompute.py`` times them side by side.
    Same contract as SDPA's function; anything else (one query, CUDA, dropout, softcap, sinks, a
    mask of another shape) is SDPA's.
    """
    if not _many_applies(query, key, attention_mask, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    chunks, positions = _QUERY_ROWS.get()
    if positions is not None and len(positions) != query.shape[2]:
        positions = None
    if attention_mask is None or chunks is None or len(chunks) < 2 or chunks[-1][1] != query.shape[2]:
        masked_from = positions[0] + 1 if positions else 0
        return _grouped_attention(query, key, value, attention_mask, scale, masked_from).contiguous(), None
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for first, end, keys in chunks:
        keys = min(keys, key.shape[2])  # the keys after a chunk's last token are masked for all its rows
        masked_from = positions[first] + 1 if positions else 0
        out[:, first:end] = _grouped_attention(query[:, :, first:end], key[:, :, :keys], value[:, :, :keys],
                                               attention_mask[:, :, first:end], scale, masked_from)
    return out, None


def _grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scale: float, masked_from: int = 0) -> torch.Tensor:
    """Attention of ``query [B, Hq, q, D]`` over the grouped ``key/value [B, Hkv, S, D]`` (additive
    ``mask`` ``[B|1, 1, q, >= S]``, zero for every row before key ``masked_from``) without copying
    K/V heads: ``[B, q, Hq, D]``. In float32 :func:`_onednn_folded_attention` where
    :data:`ONEDNN_FOLDED`; else torch's SDPA where it takes grouped heads (its CPU kernel goes over
    the keys in blocks, no ``[q, S]`` scores in memory), else :func:`_folded_attention`."""
    global ONEDNN_FOLDED
    if _onednn_applies(query.dtype, key.shape[2]):
        try:
            return _onednn_folded_attention(query, key, value, mask, scale, masked_from)
        except RuntimeError as exc:  # an optimisation: never fail the forward for it
            ONEDNN_FOLDED = False
            logger.warning("oneDNN matmuls failed in the many-query attention, using SDPA's: %s", exc)
    if not GROUPED_SDPA:
        return _folded_attention(query, key, value, mask, scale)
    S = key.shape[2]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=None if mask is None else mask[..., :S], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _folded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """Attention of ``query [B, Hq, q, D]`` over ``key/value [B, Hkv, S, D]`` (additive ``mask``
    ``[B|1, 1, q, >= S]``), the query heads of one K/V head folded into one matrix: ``[B, q, Hq, D]``."""
    B, Hq, q, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    groups = Hq // Hkv  # query head h reads K/V head h // groups (repeat_kv's order)
    folded = query.reshape(B, Hkv, groups * q, D)
    scores = torch.matmul(folded, key.transpose(2, 3)).float().mul_(scale)  # [B, Hkv, groups*q, S]
    if mask is not None:
        scores.view(B, Hkv, groups, q, S).add_(mask[:, :, None, :, :S])
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, groups*q, D]
    return out.view(B, Hq, q, D).transpose(1, 2)


def _onednn_folded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             mask: torch.Tensor | None, scale: float, masked_from: int = 0) -> torch.Tensor:
    """:func:`_folded_attention` with oneDNN's matmuls, one K/V head at a time: ``[B, q, Hq, D]``.

    Each K/V head's ``[G*q, S]`` scores (about 1 MB for 75 rows over 3.6K keys: they stay in
    cache) are one oneDNN matmul against its keys in place, the mask is added from key
    ``masked_from`` on only (every row sees the keys before it), and the probabilities are one
    more matmul against its values in place (a transposed view: oneDNN takes the strides).
    """
    assert _LINEAR is not None
    B, Hq, q, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    groups = Hq // Hkv  # query head h reads K/V head h // groups (repeat_kv's order)
    folded = query.mul(scale).reshape(B, Hkv, groups * q, D)  # a copy: query is a transposed view
    out = query.new_empty(B, q, Hkv, groups, D)
    masked_from = max(0, min(masked_from, S))
    for b in range(B):
        hidden = None
        if mask is not None and masked_from < S:
            hidden = mask[b if mask.shape[0] > 1 else 0, 0, :, masked_from:S]  # [q, S - masked_from]
        for h in range(Hkv):
            scores = _LINEAR(folded[b, h], key[b, h], None, "none", [], "")  # [G*q, S]
            if hidden is not None:
                scores.view(groups, q, S)[:, :, masked_from:].add_(hidden)
            probs = torch.softmax(scores, dim=-1)
            out[b, :, h] = _LINEAR(probs, value[b, h].T, None, "none", [], "").view(groups, q, D).transpose(0, 1)
    return out.view(B, q, Hq, D)


def _many_applies(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float,
                  kwargs: dict[str, Any]) -> bool:
    if query.shape[2] < 2 or query.device.type != "cpu":
        return False
    if not _heads_supported(query, key, dropout, kwargs, (*_UNSUPPORTED_KWARGS, "sinks")):
        return False
    return mask is None or (
        mask.is_floating_point() and mask.dim() == 4 and mask.shape[0] in (1, query.shape[0])
        and mask.shape[1] == 1 and mask.shape[2] == query.shape[2] and mask.shape[3] >= key.shape[2]
    )


def register_attention() -> None:
    """Register ``"kvcomm_decode"``, ``"kvcomm_many"`` and ``"kvcomm_sdpa"`` with transformers (idempotent).

    The mask function is SDPA's, so a 2D padding mask given to a model running under this name
    becomes the mask SDPA would get (an unregistered name would make transformers drop it). The
    fast path passes a 4D mask, which transformers forwards as-is.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, kvcomm_decode_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(MANY_ATTN_IMPLEMENTATION, many_query_attention)
    AttentionMaskInterface.register(MANY_ATTN_IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(SDPA_IMPLEMENTATION, visible_sdpa_attention)
    AttentionMaskInterface.register(SDPA_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def chunked_rows(chunks: tuple[tuple[int, int, int], ...] | None,
                 positions: list[int] | None = None) -> Iterator[None]:
    """Inside, :func:`many_query_attention` runs its rows in ``chunks`` (:func:`causal_chunks` of
    the query positions; None: one pass). With the rows' sorted ``positions``, the oneDNN path
    adds each chunk's mask from its first row's next key on only."""
    token = _QUERY_ROWS.set((chunks, positions))
    try:
        yield
    finally:
        _QUERY_ROWS.reset(token)


__all__ = [
    "ATTN_IMPLEMENTATION", "CHUNK_OVERHEAD", "FOLDED_CHUNK_OVERHEAD", "GROUPED_SDPA", "MANY_ATTN_IMPLEMENTATION",
    "ONEDNN_FOLDED", "SDPA_IMPLEMENTATION", "causal_chunks", "chunk_overhead", "chunked_rows",
    "kvcomm_decode_attention", "many_query_attention", "register_attention",
    "visible_sdpa_attention",
]
