"""Decode attention: one query token per sequence over a (static, partly filled) KV buffer.

``out = softmax(q k^T * scale + mask) v`` for ``q [B, Hq, 1, D]`` against ``k, v [B, Hkv, S, D]``
with grouped-query heads (query head ``j`` reads KV head ``j // G``, ``G = Hq // Hkv``), returned
as ``[B, 1, Hq, D]``: the layout transformers' attention functions return.

The mask is additive (0 for a visible slot) and shared by all heads. A slot whose mask value is at
or below ``torch.finfo(mask.dtype).min`` is *hidden*: it is left out of the softmax exactly (not
just pushed to a tiny weight), and the kernel never reads its K/V. A row whose slots are all
hidden has nothing to attend to and gives **zeros** (softmax over nothing is undefined; SDPA would
give NaN with a -inf mask or the mean of V with a finfo.min one).

Why a kernel: for one query token, SDPA packs the G query heads of a KV head into one [G, D] tile
and runs a prefill-style kernel with one program per KV head (8 for Llama-3.1-8B): most of the
GPU idles while those programs stream the whole buffer. Here the keys are split too
("flash-decoding"), and fully hidden key blocks of a static buffer are skipped.
"""

from __future__ import annotations

import torch

from kvcomm.errors import KernelError
from kvcomm.kernels._checks import check_float, check_same_device
from kvcomm.kernels._triton import cast_rne, cdiv, emulate_bf16, jit, next_power_of_2, target_programs, tl
from kvcomm.kernels.dispatch import use_triton

# Stage 1, partial attention over one split of the keys. Shapes / strides:
#   q [B, Hq, 1, D], k/v [B, Hkv, S, D] (any strides), mask [B or 1, 1, 1, S] (HAS_MASK; batch
#   stride 0 when broadcast), partial m/l [B*Hq, NS] and acc [B*Hq, NS, D] float32 contiguous:
#   the running max, the sum of exp(s - m) and the unnormalised sum of exp(s - m) v of each
#   (batch, query head, split).
# Grid: (B*Hkv, NS). A program loads its KV head's G queries once as a [G_P2, BLOCK_D] tile and
# walks SPLIT keys in BLOCK_N blocks with an online softmax in float32. G is 1-8 in practice,
# below tl.dot's minimum of 16, so q k^T and p v are broadcast products reduced with tl.sum: the
# op is bound by reading K/V, not by the multiply-adds.


@jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
    S, SPLIT, Hkv, NS, scale, hidden,
    q_stride_b, q_stride_h, q_stride_d,
    k_stride_b, k_stride_h, k_stride_s, k_stride_d,
    v_stride_b, v_stride_h, v_stride_s, v_stride_d,
    m_stride_b, m_stride_s,
    D: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    offs_g = tl.arange(0, G_P2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < D

    q_off = b * q_stride_b + (h * G + offs_g)[:, None] * q_stride_h + offs_d[None, :] * q_stride_d
    q = tl.load(q_ptr + q_off, mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    q = q * scale  # [G_P2, BLOCK_D]
    k_head = k_ptr + b * k_stride_b + h * k_stride_h
    v_head = v_ptr + b * v_stride_b + h * v_stride_h
    k_tile = offs_n[:, None] * k_stride_s + offs_d[None, :] * k_stride_d  # [BLOCK_N, BLOCK_D]
    v_tile = offs_n[:, None] * v_stride_s + offs_d[None, :] * v_stride_d

    m_i = tl.full([G_P2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_P2], dtype=tl.float32)
    acc = tl.zeros([G_P2, BLOCK_D], dtype=tl.float32)
    n0 = split * SPLIT
    n1 = tl.minimum(n0 + SPLIT, S)
    for start in range(n0, n1, BLOCK_N):
        keys = start + offs_n
        visible = keys < n1
        if HAS_MASK:
            # the mask is read first: a block of a static buffer's empty tail costs BLOCK_N mask
            # values, not BLOCK_N K and V rows
            bias = tl.load(mask_ptr + b * m_stride_b + keys * m_stride_s, mask=visible, other=0.0).to(tl.float32)
            visible = visible & (bias > hidden)
        else:
            bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        if tl.max(visible.to(tl.int32), axis=0) > 0:
            # hidden rows are masked out of the loads too: scattered hidden slots are not read
            kv_mask = visible[:, None] & mask_d[None, :]
            k = tl.load(k_head + start * k_stride_s + k_tile, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) + bias[None, :]  # [G_P2, BLOCK_N]
            s = tl.where(visible[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the block has a visible key
            alpha = tl.exp(m_i - m_new)  # exp(-inf) = 0 on the first visible block
            p = tl.exp(s - m_new[:, None])
            v = tl.load(v_head + start * v_stride_s + v_tile, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new

    rows = b * (Hkv * G) + h * G + offs_g  # (batch, query head) of each tile row
    tl.store(m_ptr + rows * NS + split, m_i, mask=mask_g)  # -inf: the split saw no visible key
    tl.store(l_ptr + rows * NS + split, l_i, mask=mask_g)
    a_off = (rows * NS + split)[:, None] * D + offs_d[None, :]
    tl.store(acc_ptr + a_off, acc, mask=mask_g[:, None] & mask_d[None, :])


# Stage 2, combine the NS splits of each (batch, query head) row:
#   out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,  M = max_s m_s
# Grid: (B*Hq,). out [B, 1, Hq, D] contiguous is row-major over (b, hq), so row r writes
# out + r*D. Splits come in chunks of BLOCK_S (NS can reach hundreds for one KV head).


@jit
def _decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, NS,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    top = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, NS, BLOCK_S):
        m = tl.load(m_ptr + row * NS + s0 + offs_s, mask=s0 + offs_s < NS, other=float("-inf"))
        top = tl.maximum(top, m)
    M = tl.max(top, axis=0)
    M = tl.where(M == float("-inf"), 0.0, M)  # all hidden: every weight below is exp(-inf) = 0
    num = tl.zeros([BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, NS, BLOCK_S):
        mask_s = s0 + offs_s < NS
        m = tl.load(m_ptr + row * NS + s0 + offs_s, mask=mask_s, other=float("-inf"))
        w = tl.exp(m - M)
        den += w * tl.load(l_ptr + row * NS + s0 + offs_s, mask=mask_s, other=0.0)
        a_off = (row * NS + s0 + offs_s)[:, None] * D + offs_d[None, :]
        acc = tl.load(acc_ptr + a_off, mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        num += tl.sum(w[:, None] * acc, axis=0)
    total = tl.sum(den, axis=0)
    out = num / tl.where(total > 0.0, total, 1.0)  # an all-hidden row has num = 0: zeros
    tl.store(out_ptr + row * D + offs_d, cast_rne(out, EMULATE_BF16), mask=mask_d)


COMBINE_BLOCK_S = 16


INTERPRETER_PROGRAMS = 8  # CPU interpreter: few programs, but enough that small tests still split the keys


def _block_n(g_p2: int, block_d: int) -> int:
    # keep the [G_P2, BLOCK_N, BLOCK_D] broadcast products at ~8K float32 elements
    return max(16, min(64, 8192 // (g_p2 * block_d)))


def decode_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """Launch the two kernels (arguments already checked).

    ``splits`` overrides the number of key splits (tests use it to force the combine paths);
    the default fills ~4 programs per SM. Either way it depends on shapes only, never on the
    mask's contents, so the launch is CUDA-graph capturable.
    """
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    g_p2 = next_power_of_2(G)
    block_d = next_power_of_2(D)
    block_n = _block_n(g_p2, block_d)
    if splits is None:
        splits = cdiv(target_programs(q.device, INTERPRETER_PROGRAMS), B * Hkv)
    splits = max(1, min(int(splits), cdiv(S, block_n)))
    split_len = cdiv(cdiv(S, splits), block_n) * block_n  # whole blocks per split
    splits = cdiv(S, split_len)  # every split holds at least one key

    dev = q.device
    m = torch.empty((B * Hq, splits), dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty((B * Hq, splits, D), dtype=torch.float32, device=dev)
    out = torch.empty((B, 1, Hq, D), dtype=q.dtype, device=dev)
    if mask is None:
        mask_t, m_strides, hidden = m, (0, 0), 0.0  # dummy pointer, never read
    else:
        mask_t = mask
        m_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(3))
        hidden = float(torch.finfo(mask.dtype).min)
    _decode_partial_kernel[(B * Hkv, splits)](
        q, k, v, mask_t, m, lsum, acc,
        S, split_len, Hkv, splits, float(scale), hidden,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(), *v.stride(), *m_strides,
        D=D, G=G, G_P2=g_p2, BLOCK_D=block_d, BLOCK_N=block_n, HAS_MASK=mask is not None,
    )
    _decode_combine_kernel[(B * Hq,)](
        m, lsum, acc, out, splits,
        D=D, BLOCK_D=block_d, BLOCK_S=COMBINE_BLOCK_S, EMULATE_BF16=emulate_bf16(out.dtype),
    )
    return out


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-torch decode_attention (same contract), in float32."""
    scale = _check(q, k, v, mask, scale)
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.to(torch.float32).reshape(B, Hkv, Hq // Hkv, D)  # the G query heads of each KV head
    scores = qg @ k.to(torch.float32).transpose(-1, -2) * scale  # [B, Hkv, G, S]
    if mask is None:
        out = torch.softmax(scores, dim=-1) @ v.to(torch.float32)
    else:
        visible = mask > torch.finfo(mask.dtype).min  # [B or 1, 1, 1, S]
        scores = (scores + mask.to(torch.float32)).masked_fill(~visible, torch.finfo(torch.float32).min)
        out = torch.softmax(scores, dim=-1) @ v.to(torch.float32)
        out = out * visible.any(dim=-1, keepdim=True)  # rows with nothing visible: zeros
    return out.reshape(B, 1, Hq, D).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over a KV buffer, grouped-query heads.

    Args:
        q: ``[B, Hq, 1, D]`` queries (any strides).
        k, v: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0``, q's dtype; any strides (e.g. ``buf[layer]``
            of a ``[L, B, Hkv, S, D]`` buffer).
        mask: ``None`` or an additive float mask ``[B or 1, 1, 1, S]``: 0 for a visible slot,
            ``torch.finfo(mask.dtype).min`` (or -inf) for a hidden one. Hidden slots are left
            out exactly and their K/V are not read; a row with every slot hidden gives zeros.
        scale: the score scale, default ``D ** -0.5``.
        backend: see :func:`kvcomm.kernels.get_backend`.

    Returns:
        ``[B, 1, Hq, D]`` contiguous in q's dtype (``attn_output.transpose(1, 2)`` layout).

    Raises:
        KernelError: bad shapes, dtypes, devices or mask.
    """
    scale = _check(q, k, v, mask, scale)
    if use_triton(backend, q, k, v, *([mask] if mask is not None else [])):
        return decode_attention_forward(q, k, v, mask, scale)
    return decode_attention_reference(q, k, v, mask, scale)


# typed as the public signature; the checks still reject whatever else a caller passes at runtime
def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> float:
    q, k, v = check_float("q", q), check_float("k", k), check_float("v", v)
    if q.dim() != 4:
        raise KernelError(f"q must be [B, Hq, 1, D], got shape {tuple(q.shape)}")
    if q.shape[2] != 1:
        raise KernelError(f"q must hold one query token (q_len 1), got q_len {q.shape[2]}")
    B, Hq, _, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise KernelError(f"k must be [{B}, Hkv, S, {D}] to match q, got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise KernelError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise KernelError(f"query heads must be a multiple of KV heads, got Hq={Hq}, Hkv={Hkv}")
    if S < 1 or D < 1 or B < 1:
        raise KernelError(f"q and k must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise KernelError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None:
        mask = check_float("mask", mask)
        if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1:] != (1, 1, S):
            raise KernelError(f"mask must be [{B} or 1, 1, 1, {S}] (one additive row per sequence), "
                              f"got shape {tuple(mask.shape)}")
    check_same_device(q=q, k=k, v=v, mask=mask)
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise KernelError(f"scale must be a number or None, got {scale!r}")
    return float(scale)
