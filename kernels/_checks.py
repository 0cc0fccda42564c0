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


def rope_angles(delta: int | torch.Tensor, inv_freq: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``delta * inv_freq`` in float32, duplicated over both halves: each [T, D] or [1, D]."""
    f = inv_freq.to(torch.float32)
    if isinstance(delta, int):
        d = torch.full((1, 1), delta, dtype=torch.float32, device=f.device)
    else:
        d = delta.to(device=f.device, dtype=torch.float32).reshape(tokens, 1)
    ang = d * f[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
