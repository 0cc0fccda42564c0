"""RoPE facts of a Hugging Face model and the key shift used to move cached KV.

A key cached at position p was rotated by R(p); R(a)R(b) = R(a+b), so moving a block of keys by
Δ positions is one more rotation by R(Δ) with the model's own ``inv_freq`` (rope scaling such
as Llama-3.1's only changes ``inv_freq``) and *without* the attention scaling factor, which
scales cos/sin and would compound.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcomm.errors import KVCommError


def model_inv_freq(model: Any) -> torch.Tensor:
    """The model's RoPE inverse frequencies [D/2] (float32), scaling included."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise KVCommError(
            f"{type(model).__name__} has no model.rotary_emb.inv_freq: kvcomm supports RoPE models "
            "(Llama, Qwen2 and their kin)"
        )
    return inv_freq.detach().float()


def shift_keys(k: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``[..., T, D]`` moved by ``delta`` positions (an int, or an int64 tensor [T])."""
    from kvcomm.kernels import rope_shift

    if isinstance(delta, int) and delta == 0:
        return k
    return rope_shift(k, delta, inv_freq.to(k.device))
