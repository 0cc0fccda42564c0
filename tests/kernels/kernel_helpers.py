"""Helpers shared by the kernel tests (tolerances, a verbose assert_close, a tiny RoPE)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before kvcomm.kernels is imported (see conftest)

import pytest  # noqa: E402
import torch  # noqa: E402

from kvcomm.kernels._triton import HAS_TRITON, INTERPRET  # noqa: E402

# Per-dtype (atol, rtol) for a kernel output compared with its torch reference. Both compute in
# float32 and round once to the output dtype, so:
# - float32: only cos/sin implementations (1-2 ulp), FMA contraction and summation order differ:
#   ~1e-6 relative.
# - float16: a tiny float32 difference can flip the final rounding by one ulp: 2**-10 ~ 9.8e-4
#   relative (rtol 1e-3), with an atol for values near zero.
# - bfloat16: same, one ulp is 2**-7 ~ 7.8e-3 relative (rtol 8e-3).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 8e-3),
}

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]

# CPU comparisons run the kernels through the interpreter; GPU tests need the compiled kernels
# (run them as `TRITON_INTERPRET=0 pytest -m gpu tests/kernels`).
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET), reason="needs triton with TRITON_INTERPRET=1 (set before import)"
)
requires_gpu = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available() and not INTERPRET),
    reason="needs a CUDA device, triton, and TRITON_INTERPRET unset/0",
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, n_show: int = 5) -> None:
    """torch.testing-style check that prints the first mismatching elements and their index."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double().cpu(), expected.double().cpu()
    bad = ~((a - e).abs() <= atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    if bad.any():
        idx = bad.nonzero()[:n_show]
        rows = [f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.8g}, want {e[tuple(i)].item():.8g}" for i in idx]
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}), "
            f"max abs diff {(a - e).abs().max().item():.3g}; first:\n" + "\n".join(rows)
        )


def rope_inv_freq(head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    """Llama-style inverse frequencies [D/2] (float32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """An independent tiny RoPE: x [..., T, D] (pre-RoPE) rotated to absolute positions [T]."""
    ang = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [T, D/2]
    cos, sin = ang.cos(), ang.sin()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
