"""apply_correction: the fused kernel against its reference, strided outputs, and the math."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, TOLERANCES, assert_close, needs_triton, requires_gpu, rope_inv_freq

from kvcomm.errors import KernelError
from kvcomm.kernels import apply_correction, apply_correction_reference, rope_shift_reference

LAYERS = 3


def _inputs(heads: int, tokens: int, head_dim: int, anchors: int, dtype: torch.dtype, per_channel: bool):
    base = torch.randn(LAYERS, heads, tokens, head_dim).to(dtype)
    deltas = (0.3 * torch.randn(anchors, LAYERS, heads, tokens, head_dim)).to(dtype)
    shape = (anchors, LAYERS, heads, head_dim) if per_channel else (anchors, tokens)
    weights = torch.softmax(torch.randn(shape), dim=0)
    return base, deltas, weights


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("heads", [3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_matches_reference(head_dim: int, heads: int, tokens: int, dtype: torch.dtype) -> None:
    base, deltas, weights = _inputs(heads, tokens, head_dim, 3, dtype, per_channel=False)
    kw = dict(inv_freq=rope_inv_freq(head_dim), delta_pos=torch.randint(0, 3000, (tokens,)))
    assert_close(
        apply_correction(base, deltas, weights, **kw, backend="triton"),
        apply_correction_reference(base, deltas, weights, **kw),
        *TOLERANCES[dtype],
    )


@needs_triton
@pytest.mark.parametrize("mode", ["rotate_deltas", "rotate_base_only", "values"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["token_w", "channel_w"])
@pytest.mark.parametrize("anchors", [1, 3, 5])
def test_kernel_options_match_reference(anchors: int, per_channel: bool, mode: str) -> None:
    dtype = torch.bfloat16
    base, deltas, weights = _inputs(8, 7, 64, anchors, dtype, per_channel)
    kw: dict = dict(rotate_deltas=mode == "rotate_deltas")
    if mode != "values":
        kw.update(inv_freq=rope_inv_freq(64), delta_pos=517 if per_channel else torch.arange(7) * 3 + 100)
    assert_close(
        apply_correction(base, deltas, weights, **kw, backend="triton"),
        apply_correction_reference(base, deltas, weights, **kw),
        *TOLERANCES[dtype],
    )


@needs_triton
@pytest.mark.parametrize("skip_layers", [0, 1, 2, 5])
def test_kernel_skip_layers(skip_layers: int) -> None:
    base, deltas, weights = _inputs(3, 7, 64, 3, torch.float32, per_channel=True)
    kw = dict(inv_freq=rope_inv_freq(64), delta_pos=40, skip_layers=skip_layers)
    got = apply_correction(base, deltas, weights, **kw, backend="triton")
    assert_close(got, apply_correction_reference(base, deltas, weights, **kw), 1e-5, 1e-5)
    plain = rope_shift_reference(base, 40, rope_inv_freq(64))
    lo = min(skip_layers, LAYERS)
    assert_close(got[:lo], plain[:lo], 1e-5, 1e-5)  # skipped layers: rotation only
    if lo < LAYERS:
        assert (got[lo:] - plain[lo:]).abs().max() > 1e-2  # corrected layers really moved


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_writes_into_strided_slice(dtype: torch.dtype) -> None:
    # out is cache[:, :, s:e, :] of a bigger [L, H, S, D] cache, and a head-major permuted view
    base, deltas, weights = _inputs(3, 7, 64, 3, dtype, per_channel=False)
    kw = dict(inv_freq=rope_inv_freq(64), delta_pos=12)
    want = apply_correction_reference(base, deltas, weights, **kw)
    cache = torch.full((LAYERS, 3, 20, 64), 7.0, dtype=dtype)
    out = cache[:, :, 5:12, :]
    assert not out.is_contiguous()
    got = apply_correction(base, deltas, weights, **kw, out=out, backend="triton")
    assert got.data_ptr() == out.data_ptr()
    assert_close(cache[:, :, 5:12], want, *TOLERANCES[dtype])
    assert bool((cache[:, :, :5] == 7).all() and (cache[:, :, 12:] == 7).all()), "wrote outside the slice"

    store = torch.zeros(3, LAYERS, 7, 64, dtype=dtype).transpose(0, 1)  # [L, H, T, D] view, H outer
    apply_correction(base, deltas, weights, **kw, out=store, backend="triton")
    assert_close(store, want, *TOLERANCES[dtype])


@needs_triton
def test_kernel_reads_strided_inputs_and_runs_in_place() -> None:
    base, deltas, weights = _inputs(3, 7, 64, 3, torch.float32, per_channel=True)
    kw = dict(inv_freq=rope_inv_freq(64), delta_pos=5)
    want = apply_correction_reference(base, deltas, weights, **kw)
    big = torch.randn(LAYERS, 3, 30, 64)
    big[:, :, 10:17] = base
    strided_deltas = torch.randn(3, LAYERS, 3, 11, 64)[:, :, :, 2:9]
    strided_deltas.copy_(deltas)
    w_t = weights.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert_close(apply_correction(big[:, :, 10:17], strided_deltas, w_t, **kw, backend="triton"), want, 1e-5, 1e-5)
    in_place = base.clone()
    apply_correction(in_place, deltas, weights, **kw, out=in_place, backend="triton")
    assert_close(in_place, want, 1e-5, 1e-5)


@needs_triton
def test_kernel_without_anchors_is_a_shift() -> None:
    base = torch.randn(LAYERS, 3, 7, 64)
    deltas, weights = torch.empty(0, LAYERS, 3, 7, 64), torch.empty(0, 7)
    inv = rope_inv_freq(64)
    got = apply_correction(base, deltas, weights, inv_freq=inv, delta_pos=9, skip_layers=0, backend="triton")
    assert_close(got, rope_shift_reference(base, 9, inv), 1e-5, 1e-5)


def test_rotate_deltas_modes_are_the_formulas() -> None:
    base, deltas, weights = _inputs(3, 7, 64, 3, torch.float32, per_channel=False)
    inv = rope_inv_freq(64)
    corr = torch.einsum("at,alhtd->lhtd", weights, deltas)
    corr[0] = 0  # layer 0 is never corrected (skip_layers=1)
    got = apply_correction_reference(base, deltas, weights, inv_freq=inv, delta_pos=21, rotate_deltas=True)
    assert_close(got, rope_shift_reference(base + corr, 21, inv), 1e-5, 1e-5)
    got = apply_correction_reference(base, deltas, weights, inv_freq=inv, delta_pos=21, rotate_deltas=False)
    assert_close(got, rope_shift_reference(base, 21, inv) + corr, 1e-5, 1e-5)
    got = apply_correction_reference(base, deltas, weights)  # values: no rotation
    assert_close(got, base + corr, 1e-6, 1e-6)


def test_one_hot_weights_pick_one_anchor() -> None:
    base, deltas, _ = _inputs(3, 7, 64, 3, torch.float32, per_channel=False)
    weights = torch.zeros(3, 7)
    weights[1] = 1
    got = apply_correction_reference(base, deltas, weights, skip_layers=0)
    assert_close(got, base + deltas[1], 1e-6, 1e-6)


def test_bad_arguments_raise_kernel_error() -> None:
    base, deltas, weights = _inputs(3, 7, 64, 3, torch.float32, per_channel=False)
    with pytest.raises(KernelError, match="deltas must be"):
        apply_correction(base, deltas[:, :, :, :5], weights)
    with pytest.raises(KernelError, match="weights must be per token"):
        apply_correction(base, deltas, weights[:2])
    with pytest.raises(KernelError, match="out must have base's shape"):
        apply_correction(base, deltas, weights, out=torch.empty(LAYERS, 3, 8, 64))
    with pytest.raises(KernelError, match="out must have base's dtype"):
        apply_correction(base, deltas, weights, out=torch.empty_like(base, dtype=torch.bfloat16))
    with pytest.raises(KernelError, match="skip_layers"):
        apply_correction(base, deltas, weights, skip_layers=-1)
    with pytest.raises(KernelError, match="inv_freq"):
        apply_correction(base, deltas, weights, inv_freq=rope_inv_freq(128))
    with pytest.raises(KernelError, match="base must be"):
        apply_correction(base[0], deltas, weights)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_shape(dtype: torch.dtype, per_channel: bool) -> None:
    L, H, T, D, A = 32, 8, 1024, 128, 5
    base = torch.randn(L, H, T, D, device="cuda").to(dtype)
    deltas = (0.3 * torch.randn(A, L, H, T, D, device="cuda")).to(dtype)
    shape = (A, L, H, D) if per_channel else (A, T)
    weights = torch.softmax(torch.randn(shape, device="cuda"), dim=0)
    cache = torch.zeros(L, H, T + 512, D, device="cuda", dtype=dtype)
    kw = dict(inv_freq=rope_inv_freq(D).cuda(), delta_pos=512)
    apply_correction(base, deltas, weights, **kw, out=cache[:, :, 512:], backend="triton")
    assert_close(cache[:, :, 512:], apply_correction_reference(base, deltas, weights, **kw), *TOLERANCES[dtype])
    assert bool((cache[:, :, :512] == 0).all())
