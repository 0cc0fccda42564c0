"""kvcomm.kernels: Triton kernels of the reuse path, each beside its plain-torch reference.

Every op takes ``backend=None|"auto"|"triton"|"torch"`` (see :mod:`kvcomm.kernels.dispatch`):
"auto" runs the Triton kernel on CUDA tensors and the reference elsewhere. Triton is imported
guarded, so this package imports (and the references work) where Triton is not installed.
The kernels are inference-only (no autograd).
"""

from __future__ import annotations

if __name__ == "kernels":  # the clone's root on sys.path: the installed `kernels` gets the name
    from kvcomm._shadow import hand_over

    hand_over(__name__, __file__)

from kvcomm.kernels.anchor_weights import (
    channel_weights,
    channel_weights_reference,
    token_weights,
    token_weights_reference,
)
from kvcomm.kernels.correction import apply_correction, apply_correction_reference
from kvcomm.kernels.decode_attention import decode_attention, decode_attention_reference
from kvcomm.kernels.dispatch import get_backend, set_backend
from kvcomm.kernels.quant import dequantize_kv, dequantize_kv_reference, quantize_kv, quantize_kv_reference
from kvcomm.kernels.rope_shift import rope_shift, rope_shift_reference

__all__ = [
    "apply_correction",
    "apply_correction_reference",
    "channel_weights",
    "channel_weights_reference",
    "decode_attention",
    "decode_attention_reference",
    "dequantize_kv",
    "dequantize_kv_reference",
    "get_backend",
    "quantize_kv",
    "quantize_kv_reference",
    "rope_shift",
    "rope_shift_reference",
    "set_backend",
    "token_weights",
    "token_weights_reference",
]
