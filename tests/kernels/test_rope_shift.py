"""rope_shift: the Triton kernel against its reference, and the RoPE algebra itself."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    DTYPES,
    TOLERANCES,
    assert_close,
    needs_triton,
    requires_gpu,
    rope_at,
    rope_inv_freq,
)

from kvcomm.errors import KernelError
from kvcomm.kernels import rope_shift, rope_shift_reference


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("heads", [3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_matches_reference(head_dim: int, heads: int, tokens: int, dtype: torch.dtype) -> None:
    inv_freq = rope_inv_freq(head_dim)
    k = torch.randn(2, heads, tokens, head_dim).to(dtype)  # [L, H, T, D]
    per_token = torch.randint(-5000, 5000, (tokens,))
    for delta in (37, -1000, per_token):
        assert_close(
            rope_shift(k, delta, inv_freq, backend="triton"),
            rope_shift_reference(k, delta, inv_freq),
            *TOLERANCES[dtype],
        )


@needs_triton
def test_kernel_reads_strided_input_and_any_rank() -> None:
    inv_freq = rope_inv_freq(64)
    k = torch.randn(2, 9, 3, 64).transpose(1, 2)  # [L, H, T, D] view with T and H swapped
    assert not k.is_contiguous()
    assert_close(rope_shift(k, 11, inv_freq, backend="triton"), rope_shift_reference(k, 11, inv_freq), 1e-5, 1e-5)
    k3 = torch.randn(5, 64)  # [T, D]: leading dims are optional
    assert_close(rope_shift(k3, 3, inv_freq, backend="triton"), rope_shift_reference(k3, 3, inv_freq), 1e-5, 1e-5)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_shift_moves_keys_to_later_positions(impl: str) -> None:
    # keys computed at 0..T-1 and shifted by d equal the keys computed at d..d+T-1
    head_dim, tokens, d = 64, 7, 1234
    inv_freq = rope_inv_freq(head_dim, theta=10000.0)
    raw = torch.randn(3, tokens, head_dim, dtype=torch.float64).float()  # pre-RoPE keys
    at_zero = rope_at(raw, torch.arange(tokens), inv_freq)
    at_d = rope_at(raw, torch.arange(tokens) + d, inv_freq)
    # float32 angles d*inv_freq (as the model computes them) vs the float64 truth: ~1e-4 at d~1e3
    assert_close(rope_shift(at_zero, d, inv_freq, backend=impl), at_d, 5e-4, 1e-4)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_per_token_delta_moves_each_token(impl: str) -> None:
    head_dim, tokens = 128, 9
    inv_freq = rope_inv_freq(head_dim)
    raw = torch.randn(2, tokens, head_dim)
    start = torch.arange(tokens)
    delta = torch.tensor([0, 1, 5, -3, 100, 7, 7, 2048, 1])
    got = rope_shift(rope_at(raw, start, inv_freq), delta, inv_freq, backend=impl)
    assert_close(got, rope_at(raw, start + delta, inv_freq), 5e-4, 1e-4)


def test_shifts_compose() -> None:
    inv_freq = rope_inv_freq(128)
    k = torch.randn(2, 3, 7, 128)
    a, b = 300, -77
    twice = rope_shift_reference(rope_shift_reference(k, a, inv_freq), b, inv_freq)
    assert_close(twice, rope_shift_reference(k, a + b, inv_freq), 1e-4, 1e-4)
    assert_close(rope_shift_reference(k, 0, inv_freq), k, 0.0, 0.0)


def test_shift_preserves_norm_per_pair() -> None:
    inv_freq = rope_inv_freq(64)
    k = torch.randn(4, 5, 64)
    out = rope_shift_reference(k, 999, inv_freq)
    pair = lambda x: x[..., :32] ** 2 + x[..., 32:] ** 2  # noqa: E731
    assert_close(pair(out), pair(k), 1e-5, 1e-5)


def test_bad_arguments_raise_kernel_error() -> None:
    inv = rope_inv_freq(64)
    k = torch.randn(2, 3, 5, 64)
    with pytest.raises(KernelError, match="inv_freq"):
        rope_shift(k, 1, rope_inv_freq(128))
    with pytest.raises(KernelError, match="even"):
        rope_shift(torch.randn(2, 5, 63), 1, inv)
    with pytest.raises(KernelError, match="integer"):
        rope_shift(k, torch.ones(5), inv)
    with pytest.raises(KernelError, match=r"shape \[5\]"):
        rope_shift(k, torch.arange(4), inv)
    with pytest.raises(KernelError, match="float32, float16 or bfloat16"):
        rope_shift(k.to(torch.int32), 1, inv)
    with pytest.raises(KernelError, match="at least 2 dims"):
        rope_shift(torch.randn(64), 1, inv)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_llama_shape(dtype: torch.dtype) -> None:
    inv_freq = rope_inv_freq(128).cuda()
    k = torch.randn(32, 8, 1024, 128, device="cuda").to(dtype)
    delta = torch.randint(0, 4096, (1024,), device="cuda")
    for d in (513, delta):
        assert_close(rope_shift(k, d, inv_freq, backend="triton"), rope_shift_reference(k, d, inv_freq), *TOLERANCES[dtype])
