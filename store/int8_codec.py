"""The int8 codec of the store: which tensors it quantizes, and the calls that do it.

Float keys (a name whose last dot-component is ``k``) are quantized with per-channel scales,
values (``v``) with per-token scales; every other tensor is stored raw. The one int8 reference is
:mod:`kvcomm.kernels.quant` (its Triton kernel on CUDA, its torch reference elsewhere), imported on
first use: importing the kernels imports Triton, which a store that never quantizes does not need.
"""

from __future__ import annotations

import torch

from kvcomm.store.tensor_specs import DTYPE_NAMES, INT8_FLOATS


def int8_kind(name: str, t: torch.Tensor) -> str | None:
    """``"k"`` or ``"v"`` if the int8 codec quantizes tensor ``name``, else None (stored raw)."""
    kind = name.rsplit(".", 1)[-1]
    if kind in ("k", "v") and DTYPE_NAMES.get(t.dtype) in INT8_FLOATS and t.dim() >= 2 and t.numel() > 0:
        return kind
    return None


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    from kvcomm.kernels.quant import quantize_kv

    return quantize_kv(x, kind)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from kvcomm.kernels.quant import dequantize_kv

    return dequantize_kv(q, scale, dtype)


__all__ = ["dequantize", "int8_kind", "quantize"]
