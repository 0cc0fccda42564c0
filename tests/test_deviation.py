"""The CPU correction (kvcomm.deviation, anchors read as a list) equals the kernels' references
(anchors stacked), piece by piece, and never stacks anchors."""

from __future__ import annotations

import pytest
import torch

from kvcomm import reuse
from kvcomm.config import KVCommConfig
from kvcomm.deviation import Workspace, keep_top
from kvcomm.errors import ConfigError
from kvcomm.kv import KVBlock
from kvcomm.reuse import Piece, SlotAnchors, _correct_listed, _correct_stacked

L, H, D = 3, 2, 16
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _kv(T: int, dtype: torch.dtype = torch.float32) -> KVBlock:
    return KVBlock(torch.randn(L, H, T, D).to(dtype), torch.randn(L, H, T, D).to(dtype))


def _anchors(lengths: list[int], seg: int, dtype: torch.dtype, exact: bool = False) -> SlotAnchors:
    # bases near each other, deltas small: the regime the correction works in
    return SlotAnchors([_kv(n, dtype) for n in lengths], [_kv(n, dtype) for n in lengths],
                       [_kv(seg, dtype) for _ in lengths], [5 + i for i in range(len(lengths))],
                       [2 - i for i in range(len(lengths))], exact=exact)


def _both(piece: Piece, anchors: SlotAnchors, n: int, config: KVCommConfig, dtype: torch.dtype):
    src = piece.src.slice(0, n)
    want = KVBlock(torch.zeros(L, H, n, D, dtype=dtype), torch.zeros(L, H, n, D, dtype=dtype))
    got = KVBlock(torch.zeros(L, H, n, D, dtype=dtype), torch.zeros(L, H, n, D, dtype=dtype))
    _correct_stacked(piece, anchors, src, want, INV_FREQ, config)
    _correct_listed(piece, anchors, src, got, INV_FREQ, config, Workspace())
    return want, got


CASES = [  # (kind, content length, anchor lengths, exact)
    ("slot", 7, [7, 7, 7], False),
    ("slot", 7, [9, 7, 12], False),  # longer anchors: their first 7 tokens
    ("slot", 7, [7], True),
    ("seg", 5, [7, 7], False),
    ("seg", 5, [9, 7, 11], False),  # ragged: each anchor's own last tokens
    ("seg", 5, [7], True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rerotate", [True, False])
@pytest.mark.parametrize(("kind", "T", "lengths", "exact"), CASES)
def test_listed_equals_stacked(kind, T, lengths, exact, rerotate, dtype) -> None:
    config = KVCommConfig(rerotate_key_deltas=rerotate)
    seg_len = 6
    anchors = _anchors(lengths, seg_len, dtype, exact)
    content = _kv(T, dtype)
    if kind == "slot":
        piece, n = Piece(10, content, 10, anchors, "slot"), T
    else:
        piece, n = Piece(10 + T, _kv(seg_len, dtype), 4, anchors, "seg", content), seg_len
    want, got = _both(piece, anchors, n, config, dtype)
    torch.testing.assert_close(got.k, want.k, **TOL[dtype])
    torch.testing.assert_close(got.v, want.v, **TOL[dtype])


def test_shorter_anchors_under_partial_coverage_match_the_padded_stack() -> None:
    config = KVCommConfig(min_anchor_coverage=0.5)
    anchors = _anchors([5, 8], 4, torch.float32)
    piece = Piece(3, _kv(8), 3, anchors, "slot")
    want, got = _both(piece, anchors, 8, config, torch.float32)
    torch.testing.assert_close(got.k, want.k, **TOL[torch.float32])
    torch.testing.assert_close(got.v, want.v, **TOL[torch.float32])


def test_assemble_on_cpu_never_stacks_anchors(monkeypatch) -> None:
    """A new combination of anchors costs nothing extra: the CPU path reads them where they are."""
    def no_stacking(*args, **kwargs):
        raise AssertionError("anchors were stacked on the CPU path")

    monkeypatch.setattr(reuse, "pad_stack", no_stacking)
    pool = [_kv(6) for _ in range(4)]
    deltas = [_kv(6) for _ in range(4)]
    segs = [_kv(3) for _ in range(4)]
    content = _kv(6)
    for combo in ([0, 1], [1, 2, 3], [3, 0], [2]):  # every call a new combination
        anchors = SlotAnchors([pool[i] for i in combo], [deltas[i] for i in combo], [segs[i] for i in combo],
                              [4] * len(combo), [0] * len(combo))
        pieces = [Piece(0, _kv(4), 0), Piece(4, content, 4, anchors, "slot"), Piece(10, _kv(3), 0, anchors, "seg", content)]
        out = reuse.assemble(pieces, 13, INV_FREQ, KVCommConfig(), correct=True)
        assert out.k.shape == (L, H, 13, D) and torch.isfinite(out.k).all()
        assert anchors.stacked is None


def test_keep_top_renormalises_the_kept_mass() -> None:
    w = torch.tensor([[0.7, 0.6], [0.2, 0.3], [0.1, 0.1]])  # [A=3, n=2], columns sum to 1
    keep, kept = keep_top(w, top_p=0.8, top_k=0)
    assert keep == [0, 1]
    torch.testing.assert_close(kept.sum(dim=0), torch.ones(2))
    keep, kept = keep_top(w, top_p=1.0, top_k=1)
    assert keep == [0] and torch.equal(kept, torch.ones(1, 2))
    keep, kept = keep_top(w, top_p=1.0, top_k=0)
    assert keep == [0, 1, 2] and torch.equal(kept, w)


def test_top_k_one_applies_the_heaviest_anchor_alone() -> None:
    config = KVCommConfig(correction_top_k=1, correction_scale=1.0)
    anchors = _anchors([6, 6], 4, torch.float32)
    content = anchors.base[0].slice(0, 6)  # identical to anchor 0: nearly all weight there
    piece = Piece(2, KVBlock(content.k.clone(), content.v.clone()), 2, anchors, "slot")
    got = KVBlock(torch.zeros(L, H, 6, D), torch.zeros(L, H, 6, D))
    _correct_listed(piece, anchors, piece.src, got, INV_FREQ, config, Workspace())
    want_v = content.v.clone()
    want_v[1:] += anchors.slot_deltas[0].v[1:]  # layer 0 uncorrected
    torch.testing.assert_close(got.v, want_v)


@pytest.mark.parametrize(("kind", "exact"), [("slot", False), ("seg", False), ("slot", True)])
def test_correction_scale_multiplies_the_correction_on_both_paths(kind, exact) -> None:
    """correction_scale s: out = moved + s * (corrected - moved), on the CPU path and the kernels'
    (the rotation is linear); 0 leaves the moved KV; an exact anchor's deltas are applied whole."""
    anchors = _anchors([7] if exact else [7, 7], 6, torch.float32, exact)
    if kind == "slot":
        piece, n = Piece(10, _kv(7), 10, anchors, "slot"), 7
    else:
        piece, n = Piece(17, _kv(6), 4, anchors, "seg", _kv(7)), 6
    full, _ = _both(piece, anchors, n, KVCommConfig(correction_scale=1.0), torch.float32)
    moved, _ = _both(piece, anchors, n, KVCommConfig(correction_scale=0.0), torch.float32)
    half_stacked, half_listed = _both(piece, anchors, n, KVCommConfig(correction_scale=0.5), torch.float32)
    if exact:  # the same content seen before: its measured deviation, not an estimate
        torch.testing.assert_close(moved.v, full.v)
        return
    assert (full.v - moved.v)[1:].abs().max() > 1e-3  # layer 0 is never corrected
    for got in (half_stacked, half_listed):
        torch.testing.assert_close(got.k, moved.k + 0.5 * (full.k - moved.k), **TOL[torch.float32])
        torch.testing.assert_close(got.v, moved.v + 0.5 * (full.v - moved.v), **TOL[torch.float32])
    with pytest.raises(ConfigError, match="correction_scale"):
        KVCommConfig(correction_scale=-0.1)


def test_weights_are_computed_once_per_content_and_anchor_set() -> None:
    """A second agent reading the same content over the same anchors reuses the first one's
    weights; an edited or different content recomputes them."""
    ws = Workspace()
    anchors = _anchors([6, 6, 6], 4, torch.float32)
    content = _kv(6)
    config = KVCommConfig()
    out = KVBlock(torch.zeros(L, H, 6, D), torch.zeros(L, H, 6, D))
    piece = Piece(2, content, 2, anchors, "slot")
    _correct_listed(piece, anchors, content.slice(0, 6), out, INV_FREQ, config, ws)
    first = out.k.clone()
    _correct_listed(piece, anchors, content.slice(0, 6), out, INV_FREQ, config, ws)
    assert ws.weights.hits == 2 and torch.equal(out.k, first)  # keys and values
    content.k.add_(0.5)  # edited in place: its version moved, the weights are recomputed
    _correct_listed(piece, anchors, content.slice(0, 6), out, INV_FREQ, config, ws)
    assert ws.weights.hits == 3  # only the values' weights matched


@pytest.mark.parametrize("kind", ["slot", "seg"])
def test_weights_are_kept_under_content_hashes_whichever_tensors_hold_the_kv(kind) -> None:
    """A store hands out new tensors for the same content (a Redis read, the copy a first call's
    prefill is stored as): with the content's and anchors' hashes the weights are still computed
    once; another content or anchor set, or a piece without hashes, computes its own."""
    ws = Workspace()
    anchors = _anchors([6, 6, 6], 4, torch.float32)
    anchors.hashes = ["a0", "a1", "a2"]
    config = KVCommConfig()
    segment = _kv(4)  # the text after the slot, weighted by the content's last tokens

    def piece(content: KVBlock, content_hash: str | None) -> Piece:
        if kind == "slot":
            return Piece(2, content, 2, anchors, "slot", content_hash=content_hash)
        return Piece(8, segment, 4, anchors, "seg", content, content_hash=content_hash)

    def run(p: Piece) -> KVBlock:
        n = p.src.length
        out = KVBlock(torch.zeros(L, H, n, D), torch.zeros(L, H, n, D))
        _correct_listed(p, anchors, p.src.slice(0, n), out, INV_FREQ, config, ws)
        return out

    content = _kv(6)
    first = run(piece(content, "c0"))
    copy = KVBlock(content.k.clone(), content.v.clone())  # the store's copy: other tensors, same KV
    again = run(piece(copy, "c0"))
    assert ws.weights.hits == 2  # keys and values
    torch.testing.assert_close(again.k, first.k, rtol=0, atol=0)
    torch.testing.assert_close(again.v, first.v, rtol=0, atol=0)
    run(piece(_kv(6), "c1"))  # another content
    assert ws.weights.hits == 2
    anchors.hashes = ["a0", "a1", "a3"]  # another anchor set
    run(piece(copy, "c0"))
    assert ws.weights.hits == 2
    anchors.hashes = []  # no hashes: the tensors' identities, a new copy misses
    run(piece(KVBlock(content.k.clone(), content.v.clone()), "c0"))
    assert ws.weights.hits == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta", [0, 37, -1000])
def test_shift_keys_into_a_strided_buffer_equals_shift_keys(delta, dtype) -> None:
    from kvcomm.rope import shift_keys, shift_keys_into

    k = torch.randn(L, H, 9, D).to(dtype)
    buffer = torch.full((L, 1, H, 20, D), 7.0, dtype=dtype)  # a KV buffer's layout, written at 4..13
    shift_keys_into(buffer[:, 0, :, 4:13], k, delta, INV_FREQ)
    want = shift_keys(k, delta, INV_FREQ)
    torch.testing.assert_close(buffer[:, 0, :, 4:13], want, **TOL[dtype])
    assert (buffer[:, :, :, :4] == 7).all() and (buffer[:, :, :, 13:] == 7).all()  # nothing else written


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_correction_by_layer_chunks_equals_one_pass(chunk, monkeypatch) -> None:
    from kvcomm import deviation

    src, deltas = _kv(8).k, [_kv(8).k, _kv(6).k]  # the second anchor shorter than the content
    weights = torch.softmax(torch.randn(2, L, H, D), dim=0)
    tokens = torch.softmax(torch.randn(2, 8), dim=0)
    bases = [_kv(8).v, _kv(6).v]
    outs, token_outs, dists = [], [], []
    monkeypatch.setattr(deviation, "STEP_BYTES", 0)  # the floors below set the step
    for size in (L, chunk):
        monkeypatch.setattr(deviation, "APPLY_LAYER_CHUNK", size)
        monkeypatch.setattr(deviation, "LAYER_CHUNK", size)
        assert deviation.layers_per_step(src.shape, size) == size
        for w, into in ((weights, outs), (tokens, token_outs)):
            out = torch.zeros(L, H, 8, D)
            deviation.correct_into(out, src, deltas, w, skip_layers=1, shift=11, inv_freq=INV_FREQ, ws=Workspace())
            into.append(out)
        dists.append((deviation.token_weights(src, bases, 1.0, Workspace()),
                      deviation.channel_weights(src[:, :, 2:], bases, 1.0, Workspace())))
    torch.testing.assert_close(outs[1], outs[0], **TOL[torch.float32])
    torch.testing.assert_close(token_outs[1], token_outs[0], **TOL[torch.float32])
    for got, want in zip(dists[1], dists[0], strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_short_pieces_take_one_step_and_long_ones_stay_in_cache() -> None:
    from kvcomm.deviation import APPLY_LAYER_CHUNK, STEP_BYTES, layers_per_step

    assert layers_per_step((30, 3, 30, 64), APPLY_LAYER_CHUNK) == 30  # a 30-token piece: one step
    long = layers_per_step((30, 3, 1024, 64), APPLY_LAYER_CHUNK)
    assert long == APPLY_LAYER_CHUNK and long * 3 * 1024 * 64 * 4 <= STEP_BYTES  # the floor, in cache


def _three_pieces(rerotate: bool) -> tuple[list[Piece], KVCommConfig]:
    anchors = _anchors([6, 8], 3, torch.float32)
    content = _kv(6)
    pieces = [Piece(0, _kv(4), 0), Piece(4, content, 4, anchors, "slot"), Piece(10, _kv(3), 2, anchors, "seg", content)]
    return pieces, KVCommConfig(rerotate_key_deltas=rerotate)


@pytest.mark.parametrize("rerotate", [True, False])
def test_assemble_reports_each_tokens_key_correction(rerotate) -> None:
    """``deviation``: each corrected token's squared key correction over the corrected layers, the
    difference between the corrected and the merely moved keys; -1 where nothing was corrected.
    The read-back used after a captured graph (``correction_norms``) reports the same."""
    pieces, config = _three_pieces(rerotate)
    deviation = torch.empty(13)
    out = reuse.assemble(pieces, 13, INV_FREQ, config, correct=True, deviation=deviation)
    moved = reuse.assemble(pieces, 13, INV_FREQ, config, correct=False)
    want = (out.k[1:] - moved.k[1:]).square().sum(dim=(0, 1, 3))
    want[:4] = -1.0  # the first piece has no anchors: moved only
    torch.testing.assert_close(deviation, want, atol=1e-4, rtol=1e-4)
    assert (deviation[4:] > 0).all()
    again = torch.zeros(13)
    reuse.correction_norms(pieces, out, INV_FREQ, config, correct=True, deviation=again)
    torch.testing.assert_close(again, want, atol=1e-4, rtol=1e-4)
    # without a correction nothing is reported as corrected
    reuse.assemble(pieces, 13, INV_FREQ, config, correct=False, deviation=deviation)
    assert (deviation == -1).all()


def test_boundary_by_deviation_spends_k_per_piece_where_the_deviation_is_largest() -> None:
    from kvcomm.cacheblend import deviation_boundary_selection

    deviation = torch.tensor([9.0, 1, 2, 3, 0.5,   # piece [0, 5)
                              0.1, 8, 7, 0.2,       # piece [5, 9)
                              -1, -1, -1, -1])      # piece [9, 13): moved only
    pieces = [(0, 5), (5, 9), (9, 13)]
    # keep_first=0: the uncorrected piece gets its first 2; the other 4 go to the largest corrected tokens
    assert deviation_boundary_selection(pieces, deviation, 2, keep_first=0).tolist() == [0, 3, 6, 7, 9, 10]
    # keep_first=1 (the default): each corrected piece's first token too, the other 2 by deviation
    assert deviation_boundary_selection(pieces, deviation, 2).tolist() == [0, 5, 6, 7, 9, 10]
    # a budget larger than the corrected tokens takes them all
    assert deviation_boundary_selection([(0, 2)], deviation, 5).tolist() == [0, 1]


def test_recompute_selection_combines_the_query_and_the_boundaries() -> None:
    from kvcomm.cacheblend import recompute_selection
    from kvcomm.policies import Recompute

    # a 20-token prompt: fixed prefix [0, 3), content [3, 8), segment [8, 10), content [10, 15), tail [15, 20)
    ids, fixed, slot_starts, seg_starts = list(range(20)), 3, [3, 10], [0, 8, 15]
    block = KVBlock(torch.zeros(2, 1, 19, 4), torch.zeros(2, 1, 19, 4))

    def pick(want: Recompute, deviation: torch.Tensor | None = None, served: int = 0) -> list[int]:
        return recompute_selection(want, None, ids, block, fixed, seg_starts, slot_starts, deviation, served).tolist()

    assert pick(Recompute()) == []
    # the query: the template's tail [15, 19) (the last token is always computed, never selected)
    assert pick(Recompute(query=True)) == [15, 16, 17, 18]
    # query_tokens reaches back into the last content
    assert pick(Recompute(query=True, query_tokens=6)) == [13, 14, 15, 16, 17, 18]
    # the first 2 of every moved piece: the contents at 3 and 10, the segments at 8 and 15
    assert pick(Recompute(boundary=2)) == [3, 4, 8, 9, 10, 11, 15, 16]
    assert pick(Recompute(boundary=2, boundary_at="contents")) == [3, 4, 10, 11]
    # by deviation: 2 per piece before the query, the first kept, the other where the correction is largest
    deviation = torch.zeros(19)
    deviation[[6, 9, 12]] = 5.0
    assert pick(Recompute(query=True, boundary=2, boundary_by="deviation", keep_first=1), deviation) == [
        3, 6, 8, 9, 10, 12, 15, 16, 17, 18]
    # nothing inside an exact prefix that serves the first content and segment
    by_deviation = Recompute(boundary=2, boundary_at="contents", boundary_by="deviation", keep_first=1)
    assert pick(by_deviation, deviation, served=10) == [10, 12]
    assert pick(by_deviation, deviation) == [3, 6, 10, 12]
    # the first k where the policy asks for them, whatever deviation is at hand
    assert pick(Recompute(boundary=2, boundary_at="contents"), deviation) == [3, 4, 10, 11]
