"""token_weights / channel_weights: kernels against references, and what the weights mean."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, assert_close, needs_triton, requires_gpu

from kvcomm.errors import KernelError
from kvcomm.kernels import channel_weights, channel_weights_reference, token_weights, token_weights_reference

# The weights are float32 whatever the input dtype (inputs are upcast exactly), so one float32
# tolerance serves every dtype: the kernel sums |b - a| (or (b - a)^2) in another order than
# torch's reduction, ~1e-6 relative on the distances, and the softmax keeps that scale.
ATOL, RTOL = 1e-6, 1e-5
LAYERS = 2


def _check_both(head_dim: int, heads: int, tokens: int, anchors: int, dtype: torch.dtype) -> None:
    base = torch.randn(LAYERS, heads, tokens, head_dim).to(dtype)
    # anchors longer than the content (the pool's length rule); some close to base
    anc = torch.randn(anchors, LAYERS, heads, tokens + 4, head_dim)
    anc[:, :, :, :tokens] = base.float() + torch.rand(anchors, 1, 1, 1, 1) * anc[:, :, :, :tokens]
    anc = anc.to(dtype)
    tau = 0.7
    got = token_weights(base, anc, tau, backend="triton")
    assert got.shape == (anchors, tokens) and got.dtype == torch.float32
    assert_close(got, token_weights_reference(base, anc, tau), ATOL, RTOL)
    got = channel_weights(base, anc, tau, backend="triton")
    assert got.shape == (anchors, LAYERS, heads, head_dim) and got.dtype == torch.float32
    assert_close(got, channel_weights_reference(base, anc, tau), ATOL, RTOL)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("heads", [3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_match_reference(head_dim: int, heads: int, tokens: int, dtype: torch.dtype) -> None:
    _check_both(head_dim, heads, tokens, 3, dtype)


# the anchor count crossed with lengths at one shape (the full cross costs 3x the interpreter time)
@needs_triton
@pytest.mark.parametrize("anchors", [1, 3, 5])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_kernels_match_reference_anchor_counts(tokens: int, anchors: int) -> None:
    _check_both(64, 3, tokens, anchors, torch.bfloat16)


@needs_triton
def test_kernels_read_strided_inputs() -> None:
    base = torch.randn(LAYERS, 3, 20, 64)[:, :, 4:13]  # T sliced: non-contiguous
    anc = torch.randn(3, LAYERS, 3, 64, 15).transpose(3, 4)  # [A, L, H, T_a, D] with D strided
    assert not base.is_contiguous() and not anc.is_contiguous()
    assert_close(token_weights(base, anc, backend="triton"), token_weights_reference(base, anc), ATOL, RTOL)
    assert_close(channel_weights(base, anc, backend="triton"), channel_weights_reference(base, anc), ATOL, RTOL)


@needs_triton
def test_long_content_splits_tokens() -> None:
    # enough tokens that the channel kernel splits T across programs and the token kernel rows
    base = torch.randn(LAYERS, 3, 300, 64)
    anc = torch.randn(4, LAYERS, 3, 300, 64)
    assert_close(token_weights(base, anc, backend="triton"), token_weights_reference(base, anc), ATOL, RTOL)
    assert_close(channel_weights(base, anc, backend="triton"), channel_weights_reference(base, anc), ATOL, RTOL)
    # one row, one anchor chunk: the channel kernel splits T (the interpreter targets 4 programs)
    base, anc = torch.randn(1, 1, 300, 64), torch.randn(3, 1, 1, 310, 64)
    assert_close(channel_weights(base, anc, backend="triton"), channel_weights_reference(base, anc), ATOL, RTOL)


@needs_triton
@pytest.mark.parametrize("anchors", [4, 6, 9])  # one chunk of A_CH=4, a partial second, three chunks
def test_channel_kernel_anchor_chunks(anchors: int) -> None:
    base = torch.randn(LAYERS, 3, 21, 64).to(torch.bfloat16)
    anc = torch.randn(anchors, LAYERS, 3, 25, 64).to(torch.bfloat16)
    assert_close(channel_weights(base, anc, 0.5, backend="triton"), channel_weights_reference(base, anc, 0.5),
                 ATOL, RTOL)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_channel_weights_ragged_anchor_lengths(impl: str) -> None:
    # a right-padded stack of ragged anchors reads each anchor's own last T tokens
    T, lengths = 7, [7, 12, 9, 10, 7]
    base = torch.randn(LAYERS, 3, T, 64)
    parts = [torch.randn(LAYERS, 3, n, 64) for n in lengths]
    stack = torch.full((len(lengths), LAYERS, 3, max(lengths), 64), 1e3)  # padding must never be read
    for a, x in enumerate(parts):
        stack[a, :, :, : lengths[a]] = x
    want = channel_weights_reference(base, torch.stack([x[:, :, -T:] for x in parts]))
    assert_close(channel_weights(base, stack, backend=impl, anchor_lengths=lengths), want, ATOL, RTOL)
    with pytest.raises(KernelError, match="anchor_lengths"):
        channel_weights(base, stack, backend=impl, anchor_lengths=[7, 13, 9, 10, 7])  # > T_a
    with pytest.raises(KernelError, match="anchor_lengths"):
        channel_weights(base, stack, backend=impl, anchor_lengths=[7, 12])  # not one per anchor
    # as a tensor on the device: the same weights (the kernel reads it without a host sync)
    for dtype in (torch.int32, torch.int64):
        got = channel_weights(base, stack, backend=impl, anchor_lengths=torch.tensor(lengths, dtype=dtype))
        assert_close(got, want, ATOL, RTOL)
    with pytest.raises(KernelError, match="anchor_lengths as a tensor"):
        channel_weights(base, stack, backend=impl, anchor_lengths=torch.tensor(lengths[:2]))
    with pytest.raises(KernelError, match="anchor_lengths as a tensor"):
        channel_weights(base, stack, backend=impl, anchor_lengths=torch.tensor(lengths, dtype=torch.float32))
    bad = torch.tensor([7, 13, 9, 10, 3])  # out of [T, T_a]
    if impl == "torch":  # the reference reads the values and checks them
        with pytest.raises(KernelError, match="anchor_lengths"):
            channel_weights(base, stack, backend=impl, anchor_lengths=bad)
    else:  # the kernel clamps them to [T, T_a]: never a read outside the stack
        clamped = channel_weights(base, stack, backend=impl, anchor_lengths=bad.clamp(T, max(lengths)).tolist())
        assert_close(channel_weights(base, stack, backend=impl, anchor_lengths=bad), clamped, ATOL, RTOL)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_weights_are_a_distribution_and_favour_the_identical_anchor(impl: str) -> None:
    base = torch.randn(LAYERS, 3, 9, 64)
    anc = torch.randn(5, LAYERS, 3, 12, 64)
    anc[2, :, :, :9] = base  # anchor 2 starts like base: best for the slot's own tokens
    anc[4, :, :, -9:] = base  # anchor 4 ends like base: best for the following segment
    tw = token_weights(base, anc, backend=impl)
    assert_close(tw.sum(0), torch.ones(9), 1e-6, 1e-6)
    assert bool((tw >= 0).all()) and bool((tw.argmax(0) == 2).all())
    cw = channel_weights(base, anc, backend=impl)
    assert_close(cw.sum(0), torch.ones(LAYERS, 3, 64), 1e-6, 1e-6)
    assert bool((cw.argmax(0) == 4).all())


def test_weights_follow_the_distance_formulas() -> None:
    base = torch.randn(LAYERS, 3, 5, 64)
    anc = torch.randn(2, LAYERS, 3, 5, 64)
    d = torch.stack([(base - a).abs().mean(dim=(0, 1, 3)) for a in anc])
    assert_close(token_weights_reference(base, anc, 2.0), torch.softmax(-d / 2.0, 0), 1e-6, 1e-6)
    n = torch.stack([torch.linalg.vector_norm(base - a, dim=2) for a in anc])
    assert_close(channel_weights_reference(base, anc, 0.5), torch.softmax(-n / 0.5, 0), 1e-6, 1e-6)
    # a smaller tau sharpens the distribution
    assert token_weights_reference(base, anc, 0.01).max() > token_weights_reference(base, anc, 10.0).max()


def test_bad_arguments_raise_kernel_error() -> None:
    base = torch.randn(LAYERS, 3, 5, 64)
    with pytest.raises(KernelError, match="at least as long"):
        token_weights(base, torch.randn(2, LAYERS, 3, 4, 64))
    with pytest.raises(KernelError, match="anchors must be"):
        channel_weights(base, torch.randn(2, LAYERS, 4, 5, 64))
    with pytest.raises(KernelError, match="at least one anchor"):
        token_weights(base, torch.randn(0, LAYERS, 3, 5, 64))
    with pytest.raises(KernelError, match="tau"):
        token_weights(base, torch.randn(2, LAYERS, 3, 5, 64), tau=0.0)
    with pytest.raises(KernelError, match="base must be"):
        channel_weights(base[0], torch.randn(2, LAYERS, 3, 5, 64))


@pytest.mark.gpu
@requires_gpu
def test_gpu_25_anchors_4k_tokens() -> None:
    L, H, T, D, A = 32, 8, 4096, 128, 25
    base = torch.randn(L, H, T, D, device="cuda", dtype=torch.bfloat16)
    anc = torch.randn(A, L, H, T, D, device="cuda", dtype=torch.bfloat16)
    assert_close(token_weights(base, anc, backend="triton"), token_weights_reference(base, anc), 1e-6, 1e-4)
    assert_close(channel_weights(base, anc, backend="triton"), channel_weights_reference(base, anc), 1e-6, 1e-4)
