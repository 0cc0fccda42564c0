"""Guarded Triton import: ``import kvcomm.kernels`` must work where Triton is absent (macOS).

The kernel modules take ``triton``, ``tl`` and ``jit`` from here. Without Triton, ``jit`` leaves
the function undecorated (it is never launched: dispatch falls back to the torch references) and
``tl`` is never dereferenced at import time because every kernel module uses postponed
annotations (``from __future__ import annotations``) and Triton accepts string annotations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:  # pragma: no cover - exercised by the presence or absence of triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

# Read once, when the kernels are decorated: triton.jit picks the interpreter at decoration time,
# so setting TRITON_INTERPRET after `import kvcomm.kernels` has no effect on the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit`` when Triton is installed, else the plain (never launched) function."""
    return triton.jit(fn) if HAS_TRITON else fn


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def target_programs(device: Any, interpreter: int) -> int:
    """How many programs a grid should reach to fill the GPU: 4 per SM (properties are cached, no
    sync). Under the interpreter on CPU, ``interpreter``: few programs, each kernel says how few."""
    if device.type == "cuda":
        import torch

        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return interpreter


@jit
def cast_rne(y, EMULATE_BF16: tl.constexpr):
    """Round float32 ``y`` for a store to a bfloat16 pointer the way torch's ``.to()`` does.

    The GPU's store cast already rounds to nearest even, so y is returned unchanged and
    ``tl.store`` casts it. The interpreter's float32 -> bfloat16 cast truncates, so under
    TRITON_INTERPRET the launchers set EMULATE_BF16 for bfloat16 outputs and the rounding is done
    here with integer ops: the CPU tests then compare the kernels' math, not the interpreter's
    rounding. (float16 rounds correctly in both.)
    """
    if EMULATE_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y


def emulate_bf16(dtype: object) -> bool:
    """The EMULATE_BF16 flag of :func:`cast_rne` for an output of this torch dtype."""
    import torch

    return INTERPRET and dtype == torch.bfloat16
