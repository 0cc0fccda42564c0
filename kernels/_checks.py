"""Argument checks shared by the kernel ops: every failure is a KernelError naming the argument."""

from __future__ import annotations

import torch

from kvcomm.errors import KernelError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: object, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise KernelError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < min_dim:
        raise KernelError(f"{name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise KernelError(f"tensors must be on one device: {listing}")


def check_inv_freq(inv_freq: object, head_dim: int) -> torch.Tensor:
    t = check_float("inv_freq", inv_freq)
    if head_dim % 2:
        raise KernelError(f"head dim (last axis) must be even for RoPE, got {head_dim}")
    if t.shape != (head_dim // 2,):
        raise KernelError(f"inv_freq must have shape ({head_dim // 2},) for head dim {head_dim}, got {tuple(t.shape)}")
    return t


def check_position_delta(name: str, delta: object, tokens: int) -> int | torch.Tensor:
    """A position delta: a python int (constant) or an integer tensor of shape [T] (per token)."""
    if isinstance(delta, bool):
        raise KernelError(f"{name} must be an int or an integer tensor of shape [{tokens}], got a bool")
    if isinstance(delta, int):
        return delta
    if not isinstance(delta, torch.Tensor):
        raise KernelError(f"{name} must be an int or an integer tensor of shape [{tokens}], got {type(delta).__name__}")
    if delta.dtype.is_floating_point or delta.dtype.is_complex or delta.dtype == torch.bool:
        raise KernelError(f"{name} must hold integer positions, got dtype {delta.dtype}")
    if delta.dim() == 0:
        return int(delta)  # host sync on a 0-d tensor: accepted, it is the constant-delta case
    if delta.shape != (tokens,):
        raise KernelError(f"{name} must have shape [{tokens}] (one delta per token), got {tuple(delta.shape)}")
    return delta


def rotate(x: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Float32 ``x [..., T, D]`` rotated by ``delta`` positions, as a new tensor.

    The model's convention ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``
    and the angles ``delta * inv_freq`` duplicated over both halves, computed by halves
    (``[x1 c - x2 s, x2 c + x1 s]``): no duplicated angles, no concatenated copy of x.
    """
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    f = inv_freq.to(device=x.device, dtype=torch.float32)
    if isinstance(delta, int):
        d = torch.full((1, 1), delta, dtype=torch.float32, device=x.device)
    else:
        d = delta.to(device=x.device, dtype=torch.float32).reshape(T, 1)
    ang = d * f[None, :]  # [T or 1, D/2]
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    y = torch.empty_like(x)
    y1, y2 = y[..., :half], y[..., half:]
    torch.mul(x1, c, out=y1)
    y1.sub_(x2 * s)
    torch.mul(x2, c, out=y2)
    y2.add_(x1 * s)
    return y
