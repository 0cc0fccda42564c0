"""quantize_kv / dequantize_kv: kernels against references (bit-exact), and the error bound."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, needs_triton, requires_gpu

from kvcomm.errors import KernelError
from kvcomm.kernels import dequantize_kv, dequantize_kv_reference, quantize_kv, quantize_kv_reference

# x / scale is an IEEE division and the rounding is ties-to-even in both implementations, so q
# and scale must match the reference bit for bit; dequantisation is one float32 multiply and
# one round-to-nearest-even cast: bit-exact too.


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("heads", [3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_match_reference(head_dim: int, heads: int, tokens: int, kind: str, dtype: torch.dtype) -> None:
    x = (torch.randn(2, heads, tokens, head_dim) * torch.rand(1, 1, 1, head_dim) * 4).to(dtype)
    x[0, 0] = 0  # an all-zero head: zero channels (k) and zero tokens (v)
    q, scale = quantize_kv(x, kind, backend="triton")
    q_ref, scale_ref = quantize_kv_reference(x, kind)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    want_scale_shape = (2, heads, 1, head_dim) if kind == "k" else (2, heads, tokens, 1)
    assert scale.shape == want_scale_shape
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(dequantize_kv(q, scale, dtype, backend="triton"), dequantize_kv_reference(q, scale, dtype))


@needs_triton
def test_kernels_read_strided_input() -> None:
    x = torch.randn(2, 40, 3, 64).transpose(1, 2)[:, :, 3:30]  # [L, H, T, D], non-contiguous
    for kind in ("k", "v"):
        q, scale = quantize_kv(x, kind, backend="triton")
        q_ref, scale_ref = quantize_kv_reference(x, kind)
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
        q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided q for dequantize
        assert torch.equal(dequantize_kv(q_t, scale, backend="triton"), dequantize_kv_reference(q, scale))


@needs_triton
def test_long_sequence_k_scales_span_all_tokens() -> None:
    x = torch.randn(1, 2, 300, 64)
    x[0, 1, 257, 5] = 40.0  # an outlier late in the sequence sets channel 5's scale
    q, scale = quantize_kv(x, "k", backend="triton")
    assert scale[0, 1, 0, 5].item() == pytest.approx(40.0 / 127)
    assert torch.equal(q, quantize_kv_reference(x, "k")[0])


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["k", "v"])
def test_round_trip_error_is_at_most_half_a_step(kind: str, dtype: torch.dtype, impl: str) -> None:
    x = (torch.randn(2, 3, 17, 64) * 3).to(dtype)
    q, scale = quantize_kv(x, kind, backend=impl)
    err = (dequantize_kv(q, scale, torch.float32, backend=impl) - x.float()).abs()
    # scale / 2, plus float32 rounding of x / scale and q * scale (<= 127 * 2**-23 relative)
    assert bool((err <= scale * (0.5 + 2e-5)).all()), f"max err / scale = {(err / scale).max().item()}"
    assert int(q.abs().max()) == 127  # the largest element of each group maps to +-127
    assert int(q.min()) >= -127  # symmetric: -128 unused


def test_zeros_round_trip_to_zeros() -> None:
    x = torch.zeros(2, 3, 5, 64, dtype=torch.bfloat16)
    for kind in ("k", "v"):
        q, scale = quantize_kv_reference(x, kind)
        assert bool((q == 0).all()) and bool((scale > 0).all())
        assert bool((dequantize_kv_reference(q, scale, torch.bfloat16) == 0).all())


def test_bad_arguments_raise_kernel_error() -> None:
    x = torch.randn(2, 3, 5, 64)
    with pytest.raises(KernelError, match="kind"):
        quantize_kv(x, "q")
    with pytest.raises(KernelError, match="float32, float16 or bfloat16"):
        quantize_kv(x.to(torch.int8), "k")
    q, scale = quantize_kv(x, "k")
    with pytest.raises(KernelError, match="scale must be"):
        dequantize_kv(q, scale[..., :3])
    with pytest.raises(KernelError, match="q must be an int8"):
        dequantize_kv(q.to(torch.int16), scale)
    with pytest.raises(KernelError, match="scale must be a float32"):
        dequantize_kv(q, scale.double())
    with pytest.raises(KernelError, match="dtype"):
        dequantize_kv(q, scale, torch.int32)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("kind", ["k", "v"])
def test_gpu_llama_shape(kind: str) -> None:
    x = torch.randn(32, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    q, scale = quantize_kv(x, kind, backend="triton")
    q_ref, scale_ref = quantize_kv_reference(x, kind)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    assert torch.equal(dequantize_kv(q, scale, torch.bfloat16, backend="triton"), dequantize_kv_reference(q, scale, torch.bfloat16))
