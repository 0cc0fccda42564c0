"""Fused KV correction: RoPE shift of the base cache plus the anchor-weighted deviation.

For one slot of T tokens, with A anchors whose measured deviations are ``deltas[a]``::

    rotate_deltas=True : out = R(delta_pos)(base + sum_a w_a * deltas_a)
    rotate_deltas=False: out = R(delta_pos)(base) + sum_a w_a * deltas_a

``R`` is the RoPE shift of :mod:`kvcomm.kernels.rope_shift` (``inv_freq=None``: no rotation,
the value-cache case). Layers below ``skip_layers`` get the rotation only (layer 0 is never
corrected, DESIGN §3.4). The kernel reads base and every delta of the corrected layers exactly
once and writes each output element exactly once, straight into ``out`` (which may be a strided
slice of the destination cache, e.g. ``cache[:, :, s:e, :]``).
"""

from __future__ import annotations

import torch

from kvcomm.errors import KernelError
from kvcomm.kernels._checks import (
    check_float,
    check_inv_freq,
    check_position_delta,
    check_same_device,
    rotate,
)
from kvcomm.kernels._triton import cast_rne, cdiv, emulate_bf16, jit, next_power_of_2, tl
from kvcomm.kernels.dispatch import use_triton

# Shapes / strides (all honoured, nothing is made contiguous)
#   base, out : [L, H, T, D]            deltas : [A, L, H, T, D]
#   weights   : [A, T] (TOKEN_W: one weight per token) or [A, L, H, D] (one per channel)
#   pos       : [T] int (PER_TOKEN) or the scalar pos_const; inv_freq: [D/2] (ROTATE only)
#   HALF = D/2, BLOCK_H = next_pow2(HALF); tiles are [BLOCK_T, BLOCK_H], one per half of D.
# Grid: (cdiv(T, BLOCK_T), L, cdiv(H, ROWS)). A program owns BLOCK_T tokens of one layer and
# ROWS heads: it computes cos/sin once, then per head streams base and the A deltas through
# fp32 accumulators and stores once. Layers < skip_layers run the anchor loop zero times, so
# their deltas are never read.


@jit
def _apply_correction_kernel(
    base_ptr, deltas_ptr, w_ptr, out_ptr, pos_ptr, inv_freq_ptr,
    pos_const, A, H, T, ROWS, skip_layers,
    b_stride_l, b_stride_h, b_stride_t, b_stride_d,
    d_stride_a, d_stride_l, d_stride_h, d_stride_t, d_stride_d,
    w_stride_a, w_stride_l, w_stride_h, w_stride_x,
    o_stride_l, o_stride_h, o_stride_t, o_stride_d,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    TOKEN_W: tl.constexpr, ROTATE: tl.constexpr, ROTATE_DELTAS: tl.constexpr, PER_TOKEN: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    pid_t = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    head0 = tl.program_id(2).to(tl.int64) * ROWS
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask_h = offs_h < HALF
    mask = mask_t[:, None] & mask_h[None, :]

    if ROTATE:
        inv_freq = tl.load(inv_freq_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        if PER_TOKEN:
            p = tl.load(pos_ptr + offs_t, mask=mask_t, other=0).to(tl.float32)
        else:
            p = tl.zeros([BLOCK_T], dtype=tl.float32) + pos_const  # int -> float32 promotion
        ang = p[:, None] * inv_freq[None, :]
        cos = tl.cos(ang)
        sin = tl.sin(ang)

    n_anchors = tl.where(layer >= skip_layers, A, 0)
    b_off = offs_t[:, None] * b_stride_t + offs_h[None, :] * b_stride_d
    d_off = offs_t[:, None] * d_stride_t + offs_h[None, :] * d_stride_d
    o_off = offs_t[:, None] * o_stride_t + offs_h[None, :] * o_stride_d
    b_row = base_ptr + layer * b_stride_l + head0 * b_stride_h
    d_row = deltas_ptr + layer * d_stride_l + head0 * d_stride_h
    w_row = w_ptr + layer * w_stride_l + head0 * w_stride_h
    o_row = out_ptr + layer * o_stride_l + head0 * o_stride_h
    for _ in range(head0, tl.minimum(head0 + ROWS, H)):
        x1 = tl.load(b_row + b_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(b_row + b_off + HALF * b_stride_d, mask=mask, other=0.0).to(tl.float32)
        acc1 = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        d_ptr = d_row
        wa_ptr = w_row
        for _a in range(0, n_anchors):
            d1 = tl.load(d_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
            d2 = tl.load(d_ptr + d_off + HALF * d_stride_d, mask=mask, other=0.0).to(tl.float32)
            if TOKEN_W:
                w = tl.load(wa_ptr + offs_t * w_stride_x, mask=mask_t, other=0.0).to(tl.float32)
                acc1 += w[:, None] * d1
                acc2 += w[:, None] * d2
            else:
                w1 = tl.load(wa_ptr + offs_h * w_stride_x, mask=mask_h, other=0.0).to(tl.float32)
                w2 = tl.load(wa_ptr + (offs_h + HALF) * w_stride_x, mask=mask_h, other=0.0).to(tl.float32)
                acc1 += w1[None, :] * d1
                acc2 += w2[None, :] * d2
            d_ptr += d_stride_a
            wa_ptr += w_stride_a
        if ROTATE:
            if ROTATE_DELTAS:
                x1 += acc1
                x2 += acc2
            # rotate_half(x) = [-x2, x1]
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
            if not ROTATE_DELTAS:
                y1 += acc1
                y2 += acc2
        else:
            y1 = x1 + acc1
            y2 = x2 + acc2
        tl.store(o_row + o_off, cast_rne(y1, EMULATE_BF16), mask=mask)
        tl.store(o_row + o_off + HALF * o_stride_d, cast_rne(y2, EMULATE_BF16), mask=mask)
        b_row += b_stride_h
        d_row += d_stride_h
        w_row += w_stride_h
        o_row += o_stride_h


def apply_correction_forward(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    inv_freq: torch.Tensor | None,
    delta_pos: int | torch.Tensor,
    rotate_deltas: bool,
    skip_layers: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Launch the Triton kernel (arguments already checked; ``out`` allocated)."""
    L, H, T, D = base.shape
    A = deltas.shape[0]
    if out.numel() == 0:
        return out
    half = D // 2
    block_h = next_power_of_2(half)
    # 2048-element tiles: with 8 warps ptxas needs ~48 registers (sm_90), ~100 at 4096 elements
    block_t = max(1, min(next_power_of_2(T), 2048 // (2 * block_h)))
    rows = min(8, H)
    token_w = weights.dim() == 2
    w_strides: tuple[int, ...]
    if token_w:  # [A, T]: no layer/head stride, x = token
        w_strides = (weights.stride(0), 0, 0, weights.stride(1))
    else:  # [A, L, H, D]: x = channel
        w_strides = tuple(weights.stride())
    rotate = inv_freq is not None
    per_token = isinstance(delta_pos, torch.Tensor)
    dummy = base
    grid = (cdiv(T, block_t), L, cdiv(H, rows))
    _apply_correction_kernel[grid](
        base, deltas if A else dummy, weights if A else dummy, out,
        delta_pos.contiguous() if isinstance(delta_pos, torch.Tensor) else dummy,
        inv_freq.contiguous() if inv_freq is not None else dummy,
        0 if per_token else int(delta_pos), A, H, T, rows, skip_layers,
        *base.stride(), *deltas.stride(), *w_strides, *out.stride(),
        HALF=half, BLOCK_T=block_t, BLOCK_H=block_h,
        TOKEN_W=token_w, ROTATE=rotate, ROTATE_DELTAS=bool(rotate_deltas), PER_TOKEN=per_token,
        EMULATE_BF16=emulate_bf16(out.dtype),
        num_warps=8,
    )
    return out


def apply_correction_reference(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    inv_freq: torch.Tensor | None = None,
    delta_pos: int | torch.Tensor = 0,
    rotate_deltas: bool = True,
    skip_layers: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch apply_correction (same contract)."""
    delta_pos = _check(base, deltas, weights, inv_freq, delta_pos, skip_layers, out)
    L, H, T, D = base.shape
    x = base.to(torch.float32)
    corr = torch.zeros_like(x)
    lo = min(max(skip_layers, 0), L)
    for a in range(deltas.shape[0]):  # a loop, not one einsum: no [A, L, H, T, D] fp32 temporary
        w = weights[a].to(torch.float32)
        w = w[None, None, :, None] if weights.dim() == 2 else w[lo:, :, None, :]
        corr[lo:].addcmul_(w, deltas[a, lo:].to(torch.float32))
    if inv_freq is None:
        y = corr.add_(x)
    elif rotate_deltas:
        y = rotate(corr.add_(x), delta_pos, inv_freq)
    else:
        y = rotate(x, delta_pos, inv_freq).add_(corr)
    if out is None:
        return y.to(base.dtype)
    out.copy_(y)
    return out


def apply_correction(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    inv_freq: torch.Tensor | None = None,
    delta_pos: int | torch.Tensor = 0,
    rotate_deltas: bool = True,
    skip_layers: int = 1,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate a slot's base KV to its position and add the anchor-weighted deviation, fused.

    Args:
        base: ``[L, H, T, D]`` base K or V of the slot (keys post-RoPE at positions 0..T-1).
        deltas: ``[A, L, H, T, D]`` each anchor's measured deviation (real - base).
        weights: ``[A, T]`` (per token, from :func:`token_weights`) or ``[A, L, H, D]`` (per
            channel, from :func:`channel_weights`); any float dtype, used in float32.
        inv_freq: ``[D/2]`` RoPE inverse frequencies for keys; ``None``: no rotation (values).
        delta_pos: position delta of the rotation: a python int or an integer tensor ``[T]``.
        rotate_deltas: True: rotate ``base + correction``; False: add the correction after
            rotating ``base`` (the reference code's choice).
        skip_layers: layers ``< skip_layers`` get no correction (they are still rotated).
        out: optional destination ``[L, H, T, D]`` of base's dtype, any strides (e.g. a slice
            ``cache[:, :, s:e, :]``); may be ``base`` itself (in place).
        backend: see :func:`kvcomm.kernels.get_backend`.

    Returns:
        ``out`` if given, else a new contiguous tensor of base's dtype. Math in float32.

    Raises:
        KernelError: bad shapes, dtypes or devices.
    """
    delta_pos = _check(base, deltas, weights, inv_freq, delta_pos, skip_layers, out)
    extra = [t for t in (inv_freq, out, delta_pos) if isinstance(t, torch.Tensor)]
    if not use_triton(backend, base, deltas, weights, *extra):
        return apply_correction_reference(
            base, deltas, weights, inv_freq=inv_freq, delta_pos=delta_pos,
            rotate_deltas=rotate_deltas, skip_layers=skip_layers, out=out,
        )
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    return apply_correction_forward(base, deltas, weights, inv_freq, delta_pos, rotate_deltas, skip_layers, out)


# typed as the public signature; the checks still reject whatever else a caller passes at runtime
def _check(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    inv_freq: torch.Tensor | None,
    delta_pos: int | torch.Tensor,
    skip_layers: int,
    out: torch.Tensor | None,
) -> int | torch.Tensor:
    base = check_float("base", base)
    if base.dim() != 4:
        raise KernelError(f"base must be [L, H, T, D], got shape {tuple(base.shape)}")
    L, H, T, D = base.shape
    deltas = check_float("deltas", deltas)
    if deltas.dim() != 5 or tuple(deltas.shape[1:]) != (L, H, T, D):
        raise KernelError(f"deltas must be [A, {L}, {H}, {T}, {D}] to match base, got {tuple(deltas.shape)}")
    A = deltas.shape[0]
    weights = check_float("weights", weights)
    if tuple(weights.shape) not in ((A, T), (A, L, H, D)):
        raise KernelError(
            f"weights must be per token [{A}, {T}] or per channel [{A}, {L}, {H}, {D}], got {tuple(weights.shape)}"
        )
    if inv_freq is not None:
        inv_freq = check_inv_freq(inv_freq, D)
    elif D % 2:
        raise KernelError(f"head dim (last axis) must be even, got {D}")
    if isinstance(skip_layers, bool) or not isinstance(skip_layers, int) or skip_layers < 0:
        raise KernelError(f"skip_layers must be an int >= 0, got {skip_layers!r}")
    pos = check_position_delta("delta_pos", delta_pos, T)
    if out is not None:
        out = check_float("out", out)
        if out.shape != base.shape:
            raise KernelError(f"out must have base's shape {tuple(base.shape)}, got {tuple(out.shape)}")
        if out.dtype != base.dtype:
            raise KernelError(f"out must have base's dtype {base.dtype}, got {out.dtype}")
    check_same_device(
        base=base, deltas=deltas, weights=weights, inv_freq=inv_freq, out=out,
        delta_pos=pos if isinstance(pos, torch.Tensor) else None,
    )
    return pos
