"""decode_attention: the split-K kernel against its reference, the reference against SDPA."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, TOLERANCES, assert_close, needs_triton, requires_gpu

from kvcomm.errors import KernelError
from kvcomm.kernels import decode_attention, decode_attention_reference
from kvcomm.kernels.decode_attention import decode_attention_forward

# Tolerances: kernel and reference both upcast the same inputs to float32 and round the output
# once, so TOLERANCES (one output ulp of the dtype) applies. In float32 only the summation order
# differs (online softmax over blocks and splits vs one softmax): ~5e-7 absolute on outputs of
# magnitude <= ~1, inside TOLERANCES[float32].
HEADS = [pytest.param(9, 3, id="gqa3"), pytest.param(32, 8, id="gqa4"), pytest.param(4, 4, id="mha")]


def _inputs(heads: int, kv_heads: int, slots: int, head_dim: int, dtype: torch.dtype, batch: int = 1):
    q = torch.randn(batch, heads, 1, head_dim).to(dtype)
    k = torch.randn(batch, kv_heads, slots, head_dim).to(dtype)
    v = torch.randn(batch, kv_heads, slots, head_dim).to(dtype)
    return q, k, v


def _mask(kind: str, slots: int, dtype: torch.dtype, batch: int = 1) -> torch.Tensor | None:
    """None, a partly filled static buffer (a hidden suffix), or scattered hidden slots."""
    if kind == "none":
        return None
    hidden = torch.finfo(dtype).min
    mask = torch.zeros(batch, 1, 1, slots, dtype=dtype)
    if kind == "suffix":
        mask[..., max(1, 2 * slots // 3) :] = hidden
    else:  # scattered: every third slot and a random quarter, keeping slot 0 visible
        mask[..., 1::3] = hidden
        mask[..., torch.rand(slots) < 0.25] = hidden
        mask[..., 0] = 0
        mask[..., slots // 2 :] += torch.randn(slots - slots // 2).to(dtype).clamp(-2, 0)  # soft biases too
    return mask


def _compare(q, k, v, mask, scale=None) -> None:
    got = decode_attention(q, k, v, mask, scale, backend="triton")
    assert got.shape == (q.shape[0], 1, q.shape[1], q.shape[3]) and got.is_contiguous()
    assert_close(got, decode_attention_reference(q, k, v, mask, scale), *TOLERANCES[q.dtype])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots", [1, 7, 300])
@pytest.mark.parametrize(("heads", "kv_heads"), HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_matches_reference(head_dim: int, heads: int, kv_heads: int, slots: int, dtype: torch.dtype) -> None:
    q, k, v = _inputs(heads, kv_heads, slots, head_dim, dtype)
    _compare(q, k, v, _mask("suffix", slots, dtype))


# the other mask kinds at one head layout (the full cross costs 3x the interpreter time)
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots", [7, 300])
@pytest.mark.parametrize("kind", ["none", "scattered"])
def test_kernel_matches_reference_mask_kinds(kind: str, slots: int, dtype: torch.dtype) -> None:
    q, k, v = _inputs(9, 3, slots, 128, dtype)
    _compare(q, k, v, _mask(kind, slots, dtype), scale=0.1)


@needs_triton
def test_kernel_reads_strided_views() -> None:
    # k/v as one layer of a [L, B, H, S_cap, D] buffer, sliced to S slots; q a transposed
    # projection; a per-sequence float32 mask sliced out of a wider one; a bf16 model
    L, B, H, cap, D, S = 3, 2, 2, 40, 64, 33
    kbuf = torch.randn(L, B, H, cap, D).to(torch.bfloat16)
    vbuf = torch.randn(L, B, H, cap, D).to(torch.bfloat16)
    k, v = kbuf[1][:, :, :S], vbuf[2][:, :, :S]
    # [B, Hq, 1, D] transposed as HF's projections are, with channels strided by 2
    q = torch.randn(B, 1, 3 * H, 2 * D).to(torch.bfloat16)[..., ::2].transpose(1, 2)
    wide = torch.zeros(B, 1, 1, cap + 5)
    wide[0, ..., 20:] = torch.finfo(torch.float32).min
    wide[1, ..., 3::4] = float("-inf")
    mask = wide[..., 5:]
    assert not (k.is_contiguous() or q.is_contiguous() or mask.is_contiguous())
    _compare(q, k, v, mask[..., :S])


@needs_triton
@pytest.mark.parametrize("splits", [1, 3, 100])  # 100 is capped at one split per key block
def test_split_counts_and_empty_splits(splits: int) -> None:
    # only the first 20 of 300 slots are visible: with many splits most see no visible key at
    # all, and the combine must give those no weight
    q, k, v = _inputs(8, 2, 300, 64, torch.float32, batch=2)
    mask = torch.zeros(2, 1, 1, 300)
    mask[0, ..., 20:] = torch.finfo(torch.float32).min
    mask[1, ..., :250] = torch.finfo(torch.float32).min  # a prefix hidden: the first splits empty
    got = decode_attention_forward(q, k, v, mask, 64**-0.5, splits=splits)
    assert_close(got, decode_attention_reference(q, k, v, mask), *TOLERANCES[torch.float32])


@needs_triton
def test_hidden_slots_are_never_read() -> None:
    q, k, v = _inputs(4, 2, 100, 64, torch.float16)
    mask = _mask("scattered", 100, torch.float16)
    mask[..., 60:] = torch.finfo(torch.float16).min  # whole blocks hidden as well
    hidden = (mask <= torch.finfo(torch.float16).min).reshape(100)
    want = decode_attention_reference(q, k, v, mask)
    k[:, :, hidden], v[:, :, hidden] = float("nan"), float("inf")
    got = decode_attention(q, k, v, mask, backend="triton")
    assert_close(got, want, *TOLERANCES[torch.float16])


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_hidden_row_gives_zeros(impl: str, dtype: torch.dtype) -> None:
    q, k, v = _inputs(6, 2, 40, 64, dtype, batch=3)
    mask = torch.zeros(3, 1, 1, 40, dtype=dtype)
    mask[0] = torch.finfo(dtype).min  # nothing visible: zeros, not NaN
    mask[1] = float("-inf")  # the same with a -inf mask
    mask[2, ..., 9:] = torch.finfo(dtype).min
    got = decode_attention(q, k, v, mask, backend=impl)
    assert not got.isnan().any()
    assert bool((got[:2] == 0).all())
    # a partly hidden row is attention over its visible slots alone
    assert_close(got[2:], decode_attention_reference(q[2:], k[2:, :, :9], v[2:, :, :9]), *TOLERANCES[dtype])


@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_sdpa_with_repeat_kv(masked: bool) -> None:
    # the reference against torch's SDPA over KV heads repeated to the query heads (what
    # transformers' eager/sdpa paths compute), float64 for SDPA so only the reference rounds
    q, k, v = _inputs(12, 4, 50, 64, torch.float32, batch=2)
    mask = _mask("scattered", 50, torch.float32, batch=2) if masked else None
    rep = lambda x: x.repeat_interleave(3, dim=1).double()  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), rep(k), rep(v), attn_mask=None if mask is None else mask.double(), scale=0.2
    )
    got = decode_attention_reference(q, k, v, mask, 0.2)
    assert_close(got, want.transpose(1, 2).float(), 1e-6, 1e-5)


def test_auto_backend_on_cpu_uses_the_reference() -> None:
    q, k, v = _inputs(4, 2, 9, 64, torch.float32)
    assert torch.equal(decode_attention(q, k, v, backend="auto"), decode_attention_reference(q, k, v))


def test_bad_arguments_raise_kernel_error() -> None:
    q, k, v = _inputs(6, 2, 8, 64, torch.float32)
    with pytest.raises(KernelError, match="one query token"):
        decode_attention(torch.randn(1, 6, 2, 64), k, v)
    with pytest.raises(KernelError, match="q must be"):
        decode_attention(q[0], k, v)
    with pytest.raises(KernelError, match="multiple of KV heads"):
        decode_attention(q, torch.randn(1, 4, 8, 64), torch.randn(1, 4, 8, 64))
    with pytest.raises(KernelError, match="k must be"):
        decode_attention(q, torch.randn(1, 2, 8, 32), v)
    with pytest.raises(KernelError, match="v must have"):
        decode_attention(q, k, v[:, :, :5])
    with pytest.raises(KernelError, match="share one dtype"):
        decode_attention(q, k.half(), v.half())
    with pytest.raises(KernelError, match="mask must be"):
        decode_attention(q, k, v, torch.zeros(1, 6, 1, 8))  # per-head masks are not supported
    with pytest.raises(KernelError, match="mask must be"):
        decode_attention(q, k, v, torch.zeros(1, 1, 1, 9))
    with pytest.raises(KernelError, match="mask must be float"):
        decode_attention(q, k, v, torch.ones(1, 1, 1, 8, dtype=torch.bool))
    with pytest.raises(KernelError, match="one device"):
        decode_attention(q, k, v, torch.zeros(1, 1, 1, 8, device="meta"))
    with pytest.raises(KernelError, match="scale"):
        decode_attention(q, k, v, None, "0.1")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("filled", [2048, 4096])
def test_gpu_llama_8b_shape_and_graph_capture(filled: int) -> None:
    S = 4096
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    kbuf = torch.randn(2, 1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
    vbuf = torch.randn_like(kbuf)
    mask = torch.zeros(1, 1, 1, S, device="cuda", dtype=torch.bfloat16)
    mask[..., filled:] = torch.finfo(torch.bfloat16).min
    want = decode_attention_reference(q, kbuf[1], vbuf[1], mask)
    assert_close(decode_attention(q, kbuf[1], vbuf[1], mask, backend="triton"), want, *TOLERANCES[torch.bfloat16])
    # the launch is graph-capturable, and a replay reads the mask's current contents
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, kbuf[1], vbuf[1], mask, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, kbuf[1], vbuf[1], mask, backend="triton")
    mask[..., : filled // 2] = torch.finfo(torch.bfloat16).min
    graph.replay()
    want = decode_attention_reference(q, kbuf[1], vbuf[1], mask)
    assert_close(out, want, *TOLERANCES[torch.bfloat16])
