"""Symmetric int8 quantisation of a KV block, for the store (halves bf16 bytes, quarters fp32).

Scales follow the store's int8 codec (docs/INTERFACES.md): keys per channel (amax over the token
axis -2, so scale is ``[..., 1, D]``: RoPE and outlier channels keep their own range), values per
token (amax over the channel axis -1, scale ``[..., T, 1]``). ``scale = amax / 127`` in float32,
``q = round_half_even(x / scale)`` clamped to [-127, 127] (symmetric: -128 is never used); the
scale is floored at float32's smallest normal (``tiny``) so an all-zero channel/token gives q 0
without a division by zero, as the store codec's reference does. Dequantisation is ``q * scale``; the error per
element is at most ``scale / 2``.
"""

from __future__ import annotations

import torch

from kvcomm.errors import KernelError
from kvcomm.kernels._checks import check_float, check_same_device
from kvcomm.kernels._triton import cast_rne, cdiv, emulate_bf16, jit, next_power_of_2, tl
from kvcomm.kernels.dispatch import use_triton

KINDS = ("k", "v")

# Rounding: 1.5 * 2**23 added then subtracted rounds a float32 |y| < 2**22 to the nearest
# integer, ties to even (IEEE add), which is torch.round's rule; it is exact on GPU and in the
# interpreter (no fast-math reassociation in Triton). x / scale is the IEEE division (div_rn).
_RNE_MAGIC = 12582912.0
_FLT_TINY = torch.finfo(torch.float32).tiny

# quantize, keys (per channel). Shapes / strides:
#   x [N, T, D] any strides; q [N, T, D] int8 contiguous; scale [N, 1, D] float32 contiguous.
# Grid: (N, cdiv(D, BLOCK_D)). Two passes over the program's T x BLOCK_D column block: amax
# over T, then quantise (the second read mostly hits L2 for the column block just streamed).


@jit
def _quantize_k_kernel(
    x_ptr, q_ptr, scale_ptr, T, D,
    x_stride_n, x_stride_t, x_stride_d,
    FLT_TINY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < D
    x_blk = x_ptr + n * x_stride_n
    q_blk = q_ptr + n * T * D
    amax = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        mask = ((t0 + offs_t) < T)[:, None] & mask_d[None, :]
        off = (t0 + offs_t)[:, None] * x_stride_t + offs_d[None, :] * x_stride_d
        x = tl.load(x_blk + off, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = tl.maximum(tl.math.div_rn(amax, 127.0), FLT_TINY)
    tl.store(scale_ptr + n * D + offs_d, scale, mask=mask_d)
    for t0 in range(0, T, BLOCK_T):
        mask = ((t0 + offs_t) < T)[:, None] & mask_d[None, :]
        off = (t0 + offs_t)[:, None] * x_stride_t + offs_d[None, :] * x_stride_d
        x = tl.load(x_blk + off, mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, scale[None, :])
        y = (y + 12582912.0) - 12582912.0  # _RNE_MAGIC: round half to even
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        tl.store(q_blk + (t0 + offs_t)[:, None] * D + offs_d[None, :], y.to(tl.int8), mask=mask)


# quantize, values (per token). Shapes / strides:
#   x [M, D] rows = all (..., t) any row/channel stride; q [M, D] int8; scale [M, 1] float32.
# Grid: (cdiv(M, BLOCK_M),). One pass: a row's D channels sit in one tile.


@jit
def _quantize_v_kernel(
    x_ptr, q_ptr, scale_ptr, M, D, x_stride_m, x_stride_d,
    FLT_TINY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * x_stride_m + offs_d[None, :] * x_stride_d, mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0), FLT_TINY)
    tl.store(scale_ptr + offs_m, scale, mask=mask_m)
    y = tl.math.div_rn(x, scale[:, None])
    y = (y + 12582912.0) - 12582912.0  # _RNE_MAGIC: round half to even
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    tl.store(q_ptr + offs_m[:, None] * D + offs_d[None, :], y.to(tl.int8), mask=mask)


# dequantize (both kinds). Shapes / strides:
#   q [N, T, D] int8 any strides; scale [N, T|1, D|1] float32 (stride 0 on the broadcast axis);
#   out [N, T, D] contiguous of the requested dtype. Rows m = n*T + t.
# Grid: (cdiv(N*T, BLOCK_M),).


@jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr, M, T, D,
    q_stride_n, q_stride_t, q_stride_d,
    s_stride_n, s_stride_t, s_stride_d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n = offs_m // T
    t = offs_m % T
    mask = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_ptr + (n * q_stride_n + t * q_stride_t)[:, None] + offs_d[None, :] * q_stride_d, mask=mask, other=0)
    s = tl.load(scale_ptr + (n * s_stride_n + t * s_stride_t)[:, None] + offs_d[None, :] * s_stride_d, mask=mask, other=0.0)
    y = q.to(tl.float32) * s
    out = cast_rne(y, EMULATE_BF16)
    tl.store(out_ptr + offs_m[:, None] * D + offs_d[None, :], out, mask=mask)


def quantize_kv_forward(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the quantisation kernel (arguments already checked)."""
    T, D = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale_shape = (*lead, 1, D) if kind == "k" else (*lead, T, 1)
    scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, scale.zero_()
    if kind == "k":
        x3 = x.reshape(-1, T, D)
        block_d = min(64, next_power_of_2(D))
        block_t = max(1, min(next_power_of_2(T), 4096 // block_d))
        _quantize_k_kernel[(x3.shape[0], cdiv(D, block_d))](
            x3, q, scale, T, D, *x3.stride(), FLT_TINY=_FLT_TINY, BLOCK_T=block_t, BLOCK_D=block_d,
        )
    else:
        x2 = x.reshape(-1, D)
        block_d = next_power_of_2(D)
        block_m = max(1, min(next_power_of_2(x2.shape[0]), 4096 // block_d))
        _quantize_v_kernel[(cdiv(x2.shape[0], block_m),)](
            x2, q, scale, x2.shape[0], D, *x2.stride(), FLT_TINY=_FLT_TINY, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    return q, scale


def dequantize_kv_forward(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Launch the dequantisation kernel (arguments already checked)."""
    T, D = q.shape[-2], q.shape[-1]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if q.numel() == 0:
        return out
    q3 = q.reshape(-1, T, D)
    s3 = scale.reshape(-1, scale.shape[-2], scale.shape[-1])
    s_strides = [0 if s3.shape[i] == 1 else s3.stride(i) for i in range(3)]
    block_d = next_power_of_2(D)
    block_m = max(1, min(next_power_of_2(q3.shape[0] * T), 4096 // block_d))
    M = q3.shape[0] * T
    _dequantize_kernel[(cdiv(M, block_m),)](
        q3, s3, out, M, T, D, *q3.stride(), *s_strides,
        BLOCK_M=block_m, BLOCK_D=block_d, EMULATE_BF16=emulate_bf16(out.dtype),
    )
    return out


def quantize_kv_reference(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch quantize_kv (same contract)."""
    _check_quantize(x, kind)
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-2 if kind == "k" else -1, keepdim=True)
    # divide by a tensor, not a Python scalar: CUDA torch turns `t / 127` into `t * (1/127)`,
    # which differs from IEEE division by an ulp and flips a few roundings against the kernel
    scale = (amax / amax.new_tensor(127.0)).clamp_min(_FLT_TINY)
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_kv_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch dequantize_kv (same contract)."""
    _check_dequantize(q, scale, dtype)
    return (q.to(torch.float32) * scale).to(dtype)


def quantize_kv(x: torch.Tensor, kind: str, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a K or V block to int8 with float32 scales.

    Args:
        x: ``[..., T, D]`` float32/float16/bfloat16, any strides.
        kind: ``"k"`` (per-channel scales, ``[..., 1, D]``) or ``"v"`` (per-token, ``[..., T, 1]``).
        backend: see :func:`kvcomm.kernels.get_backend`.

    Returns:
        ``(q, scale)``: ``q`` int8 of x's shape (contiguous), ``scale`` float32 with x's rank.

    Raises:
        KernelError: bad kind, shape, dtype.
    """
    _check_quantize(x, kind)
    if use_triton(backend, x):
        return quantize_kv_forward(x, kind)
    return quantize_kv_reference(x, kind)


def dequantize_kv(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *, backend: str | None = None
) -> torch.Tensor:
    """Undo :func:`quantize_kv`: ``q * scale`` cast to ``dtype`` (float32 math).

    Args:
        q: ``[..., T, D]`` int8.
        scale: float32 ``[..., 1, D]`` (keys) or ``[..., T, 1]`` (values).
        dtype: the output dtype (float32/float16/bfloat16).
        backend: see :func:`kvcomm.kernels.get_backend`.

    Raises:
        KernelError: bad shapes, dtypes or devices.
    """
    _check_dequantize(q, scale, dtype)
    if use_triton(backend, q, scale):
        return dequantize_kv_forward(q, scale, dtype)
    return dequantize_kv_reference(q, scale, dtype)


def _check_quantize(x: object, kind: object) -> None:
    check_float("x", x, min_dim=2)
    if kind not in KINDS:
        raise KernelError(f"kind must be 'k' (per-channel scales) or 'v' (per-token scales), got {kind!r}")


def _check_dequantize(q: object, scale: object, dtype: object) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() < 2:
        got = f"{q.dtype} {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise KernelError(f"q must be an int8 tensor [..., T, D], got {got}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        got = f"{scale.dtype}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise KernelError(f"scale must be a float32 tensor, got {got}")
    *lead, T, D = q.shape
    if tuple(scale.shape) not in ((*lead, 1, D), (*lead, T, 1)):
        raise KernelError(
            f"scale must be [..., 1, {D}] (keys) or [..., {T}, 1] (values) for q {tuple(q.shape)}, "
            f"got {tuple(scale.shape)}"
        )
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    check_same_device(q=q, scale=scale)
