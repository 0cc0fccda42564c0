"""kvcomm.kernels: Triton kernels of the reuse path, each beside its plain-torch reference.

Every op takes ``backend=None|"auto"|"triton"|"torch"`` (see :mod:`kvcomm.kernels.dispatch`):
"auto" runs the Triton kernel on CUDA tensors and the reference elsewhere. Triton is imported
guarded, so this package imports (and the references work) where Triton is not installed.
The kernels are inference-only (no autograd).
"""

from __future__ import annotations

import sys

if __name__ == "kernels":  # pragma: no cover - run in a subprocess by tests/test_package.py
    # This folder installs as kvcomm.kernels. A Python started in a clone's root (a REPL, `python
    # -m ...`, `python -c`) has the root on sys.path, so a bare `import kernels` finds this folder
    # before the Hugging Face `kernels` distribution that transformers imports (and fails on).
    # Hand the name over to the installed one where there is one: `import` returns what
    # sys.modules holds when the module's code ends.
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _others)
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _installed
        try:
            _spec.loader.exec_module(_installed)
        except BaseException:
            del sys.modules["kernels"]
            raise

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
