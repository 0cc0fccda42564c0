"""RoPE shift: rotate cached keys by a constant or per-token position delta.

A key computed at position p and rotated by Δ equals the key the model computes at p + Δ
(RoPE rotations compose additively). The rotation is the model's (rotate_half convention:
first half / second half of the head dim), with cos/sin of ``Δ * inv_freq`` taken in float32
and duplicated over both halves and *no* attention scaling factor. Llama-3.1 rope scaling only
changes ``inv_freq``, so it needs nothing special here. Math in float32, result in k's dtype.
"""

from __future__ import annotations

import torch

from kvcomm.kernels._checks import (
    check_float,
    check_inv_freq,
    check_position_delta,
    check_same_device,
    rotate,
)
from kvcomm.kernels._triton import cast_rne, cdiv, emulate_bf16, jit, next_power_of_2, tl
from kvcomm.kernels.dispatch import use_triton

# Shapes / strides
#   k, out : [N, T, D] (leading dims flattened; any strides)   delta: [T] int (PER_TOKEN) or scalar
#   inv_freq : [D/2] contiguous, HALF = D/2, BLOCK_H = next_pow2(HALF) (masked)
# Grid: (cdiv(T, BLOCK_T), cdiv(N, ROWS)). A program computes the cos/sin tile of its BLOCK_T
# tokens once and applies it to ROWS consecutive rows (e.g. the 8 KV heads of one layer), so the
# transcendental cost is amortised and every k element is read once and written once.


@jit
def _rope_shift_kernel(
    k_ptr, out_ptr, delta_ptr, inv_freq_ptr,
    delta_const, N, T, ROWS,
    k_stride_n, k_stride_t, k_stride_d,
    o_stride_n, o_stride_t, o_stride_d,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, PER_TOKEN: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_h < HALF)[None, :]

    inv_freq = tl.load(inv_freq_ptr + offs_h, mask=offs_h < HALF, other=0.0).to(tl.float32)
    if PER_TOKEN:
        d = tl.load(delta_ptr + offs_t, mask=mask_t, other=0).to(tl.float32)
    else:
        d = tl.zeros([BLOCK_T], dtype=tl.float32) + delta_const  # int -> float32 promotion
    ang = d[:, None] * inv_freq[None, :]  # [BLOCK_T, BLOCK_H] float32, as the reference
    cos = tl.cos(ang)
    sin = tl.sin(ang)

    k_off = offs_t[:, None] * k_stride_t + offs_h[None, :] * k_stride_d
    o_off = offs_t[:, None] * o_stride_t + offs_h[None, :] * o_stride_d
    row0 = pid_r * ROWS
    k_row = k_ptr + row0 * k_stride_n
    o_row = out_ptr + row0 * o_stride_n
    for _ in range(row0, tl.minimum(row0 + ROWS, N)):
        x1 = tl.load(k_row + k_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(k_row + k_off + HALF * k_stride_d, mask=mask, other=0.0).to(tl.float32)
        # rotate_half(x) = [-x2, x1]
        y1 = cast_rne(x1 * cos - x2 * sin, EMULATE_BF16)
        y2 = cast_rne(x2 * cos + x1 * sin, EMULATE_BF16)
        tl.store(o_row + o_off, y1, mask=mask)
        tl.store(o_row + o_off + HALF * o_stride_d, y2, mask=mask)
        k_row += k_stride_n
        o_row += o_stride_n


def rope_shift_forward(k: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Launch the Triton kernel (arguments already checked)."""
    T, D = k.shape[-2], k.shape[-1]
    k3 = k.reshape(-1, T, D)  # a view whenever the leading dims allow it
    out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    out3 = out.view(-1, T, D)
    N = k3.shape[0]
    if out.numel() == 0:
        return out
    half = D // 2
    block_h = next_power_of_2(half)
    block_t = max(1, min(next_power_of_2(T), 4096 // (2 * block_h)))
    rows = min(8, N)
    per_token = isinstance(delta, torch.Tensor)
    # a dummy pointer when the delta is a constant
    delta_t = delta.contiguous() if isinstance(delta, torch.Tensor) else inv_freq
    grid = (cdiv(T, block_t), cdiv(N, rows))
    _rope_shift_kernel[grid](
        k3, out3, delta_t, inv_freq.contiguous(),
        0 if per_token else int(delta), N, T, rows,
        *k3.stride(), *out3.stride(),
        HALF=half, BLOCK_T=block_t, BLOCK_H=block_h, PER_TOKEN=per_token,
        EMULATE_BF16=emulate_bf16(out.dtype),
        num_warps=8,  # 4096-element tiles: ~54 registers on sm_90 with 8 warps, 116 with 4
    )
    return out


def rope_shift_reference(k: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Plain-torch rope_shift (same contract)."""
    k, delta, inv_freq = _check(k, delta, inv_freq)
    return rotate(k.to(torch.float32), delta, inv_freq).to(k.dtype)


def rope_shift(
    k: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Rotate post-RoPE keys by a position delta.

    Args:
        k: keys ``[..., T, D]`` (float32/float16/bfloat16), any strides.
        delta: a python int (every token moves by it) or an integer tensor ``[T]`` (per token).
        inv_freq: ``[D/2]`` RoPE inverse frequencies (with the model's rope scaling applied).
        backend: ``None`` (the default from :func:`kvcomm.kernels.get_backend`), ``"auto"``,
            ``"triton"`` or ``"torch"``.

    Returns:
        A new tensor like ``k`` (contiguous): ``k * cos(Δθ) + rotate_half(k) * sin(Δθ)``.

    Raises:
        KernelError: bad shapes, dtypes or devices.
    """
    k, delta, inv_freq = _check(k, delta, inv_freq)
    if use_triton(backend, k, inv_freq, *([delta] if isinstance(delta, torch.Tensor) else [])):
        return rope_shift_forward(k, delta, inv_freq)
    return rope_shift_reference(k, delta, inv_freq)


# typed as the public signature; the checks still reject whatever else a caller passes at runtime
def _check(
    k: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, int | torch.Tensor, torch.Tensor]:
    k = check_float("k", k, min_dim=2)
    inv_freq = check_inv_freq(inv_freq, k.shape[-1])
    delta = check_position_delta("delta", delta, k.shape[-2])
    check_same_device(k=k, inv_freq=inv_freq, delta=delta if isinstance(delta, torch.Tensor) else None)
    return k, delta, inv_freq
