"""The correction's CUDA-graph bookkeeping (AssembleGraphs) gives assemble()'s result (CPU).

The "eager" backend records the same static-input closure a CUDA graph would capture and re-runs
it, so every check here (layout keys, static buffers, skipped copies, LRU, fallback) holds for the
CUDA backend, whose only difference is the capture itself (benchmarks/gpu_suite.sh runs it).
"""

from __future__ import annotations

import logging

import pytest
import torch

import kvcomm.fastpath as fastpath_module
from kvcomm import KVCommConfig, KVCommEngine, Template
from kvcomm.fastpath.graphs import AssembleGraphs
from kvcomm.fastpath.stacks import StackCache
from kvcomm.fastpath.static_cache import StaticPromptCache
from kvcomm.kernels import set_backend
from kvcomm.kernels._triton import HAS_TRITON, INTERPRET
from kvcomm.kv import KVBlock
from kvcomm.reuse import Piece, SlotAnchors, assemble
from kvcomm.store import MemoryStore

needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs triton with TRITON_INTERPRET=1")
L, H, D = 3, 2, 8
CONFIG = KVCommConfig()
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def _kv(T: int, device: str = "cpu") -> KVBlock:
    return KVBlock(torch.randn(L, H, T, D, device=device), torch.randn(L, H, T, D, device=device))


class Layout:
    """seg0 | slot (T tokens, A anchors) | seg1: fixed template and anchors, contents per request."""

    def __init__(self, T: int = 5, A: int = 2, seg0: int = 4, seg1: int = 3, anchor_lengths=None,
                 device: str = "cpu") -> None:
        self.T, self.seg0_len, self.seg1_len = T, seg0, seg1
        self.template = _kv(seg0 + seg1, device)
        lengths = anchor_lengths or [T] * A
        self.anchors = SlotAnchors([_kv(n, device) for n in lengths], [_kv(n, device) for n in lengths],
                                   [_kv(seg1, device) for _ in lengths], [seg0] * A, [2] * A)
        self.stacks = StackCache()

    @property
    def total(self) -> int:
        return self.seg0_len + self.T + self.seg1_len

    def pieces(self, content: KVBlock) -> list[Piece]:
        # a new SlotAnchors per call, as the engine's planner makes: the stacks come from the cache
        a = SlotAnchors(self.anchors.base, self.anchors.slot_deltas, self.anchors.segment_deltas,
                        self.anchors.slot_shifts, self.anchors.segment_shifts)
        a.stacks(self.stacks.stack)
        s0, T = self.seg0_len, self.T
        return [
            Piece(0, self.template.slice(0, s0), 0),
            Piece(s0, content, s0, a, "slot"),
            Piece(s0 + T, self.template.slice(s0, s0 + self.seg1_len), T, a, "seg", content),
        ]


def _out(total: int) -> KVBlock:
    return KVBlock(torch.zeros(L, H, total, D), torch.zeros(L, H, total, D))


def _expected(pieces: list[Piece], total: int) -> KVBlock:
    return assemble(pieces, total, INV_FREQ, CONFIG, correct=True)


def test_layout_captured_when_seen_twice_then_replayed_with_new_contents():
    lay, graphs = Layout(), AssembleGraphs(4, backend="eager")
    out = _out(lay.total)
    for i in range(5):
        content = _kv(lay.T)  # a new content every request, same length
        pieces = lay.pieces(content)
        got = graphs.run(pieces, lay.total, INV_FREQ, CONFIG, correct=True, out=out)
        want = _expected(pieces, lay.total)
        assert got.k is out.k
        assert torch.equal(out.k, want.k) and torch.equal(out.v, want.v), i
        assert (graphs.captures, graphs.replays) == ((0, 0) if i == 0 else (1, i))


def test_unchanged_content_is_not_copied_again_but_an_edit_in_place_is(monkeypatch):
    lay, graphs = Layout(), AssembleGraphs(4, backend="eager")
    out, content = _out(lay.total), _kv(lay.T)
    for _ in range(2):
        graphs.run(lay.pieces(content), lay.total, INV_FREQ, CONFIG, correct=True, out=out)
    copies = []
    real_copy = torch.Tensor.copy_

    def spy(self, src, *args, **kwargs):
        copies.append(src)
        return real_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    graphs.run(lay.pieces(content), lay.total, INV_FREQ, CONFIG, correct=True, out=out)
    assert not any(src is content.k or src is content.v for src in copies)
    content.v.mul_(2)  # the version counter moves: the static buffer must be refreshed
    graphs.run(lay.pieces(content), lay.total, INV_FREQ, CONFIG, correct=True, out=out)
    assert any(src is content.v for src in copies)
    want = _expected(lay.pieces(content), lay.total)
    assert torch.equal(out.v, want.v) and torch.equal(out.k, want.k)


def test_inference_tensor_contents_are_copied_every_call():
    lay, graphs = Layout(), AssembleGraphs(4, backend="eager")
    out = _out(lay.total)
    with torch.inference_mode():
        content = _kv(lay.T)
    for _ in range(2):
        graphs.run(lay.pieces(content), lay.total, INV_FREQ, CONFIG, correct=True, out=out)
    with torch.inference_mode():
        content.k.mul_(3)  # no version counter to move: the copy must not be skipped
    graphs.run(lay.pieces(content), lay.total, INV_FREQ, CONFIG, correct=True, out=out)
    assert graphs.replays == 2  # the capture call replays too
    want = _expected(lay.pieces(content), lay.total)
    assert torch.equal(out.k, want.k) and torch.equal(out.v, want.v)


def test_other_anchors_or_lengths_are_another_layout():
    lay, graphs = Layout(), AssembleGraphs(4, backend="eager")
    out = _out(lay.total)
    for _ in range(2):
        graphs.run(lay.pieces(_kv(lay.T)), lay.total, INV_FREQ, CONFIG, correct=True, out=out)
    other = Layout()  # same shapes, other anchor tensors: the key holds their addresses
    other.template = lay.template
    for _ in range(3):
        pieces = other.pieces(_kv(other.T))
        graphs.run(pieces, other.total, INV_FREQ, CONFIG, correct=True, out=out)
        want = _expected(pieces, other.total)
        assert torch.equal(out.k, want.k) and torch.equal(out.v, want.v)
    assert graphs.captures == 2 and len(graphs) == 2


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_ragged_anchors_replay_exactly(backend):
    set_backend(backend)
    lay = Layout(T=4, A=3, anchor_lengths=[4, 6, 5])
    graphs = AssembleGraphs(4, backend="eager")
    out = _out(lay.total)
    for _ in range(3):
        pieces = lay.pieces(_kv(lay.T))
        assert pieces[1].anchors.stacks().lengths_on_device is not None
        graphs.run(pieces, lay.total, INV_FREQ, CONFIG, correct=True, out=out)
        want = _expected(pieces, lay.total)
        assert torch.equal(out.k, want.k) and torch.equal(out.v, want.v)
    assert graphs.replays == 2


@pytest.fixture(autouse=True)
def _default_kernel_backend():
    yield
    set_backend(None)


def test_lru_bound_and_zero_disables():
    graphs = AssembleGraphs(2, backend="eager")
    layouts = [Layout() for _ in range(3)]
    for lay in layouts:
        out = _out(lay.total)  # the destination is read by address: a new buffer is a new layout
        for _ in range(2):
            graphs.run(lay.pieces(_kv(lay.T)), lay.total, INV_FREQ, CONFIG, correct=True, out=out)
    assert graphs.captures == 3 and len(graphs) == 2
    off = AssembleGraphs(0, backend="eager")
    lay = Layout()
    out = _out(lay.total)
    for _ in range(3):
        off.run(lay.pieces(_kv(lay.T)), lay.total, INV_FREQ, CONFIG, correct=True, out=out)
    assert off.captures == 0 and len(off) == 0
    with pytest.raises(ValueError, match="backend"):
        AssembleGraphs(2, backend="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA capture fails")
def test_failed_capture_warns_once_and_runs_eagerly(caplog):
    lay, graphs = Layout(), AssembleGraphs(4, backend="cuda")
    out = _out(lay.total)
    with caplog.at_level(logging.WARNING, logger="kvcomm.fastpath.graphs"):
        for _ in range(4):
            pieces = lay.pieces(_kv(lay.T))
            graphs.run(pieces, lay.total, INV_FREQ, CONFIG, correct=True, out=out)
            want = _expected(pieces, lay.total)
            assert torch.equal(out.k, want.k) and torch.equal(out.v, want.v)
    assert graphs.captures == 0
    assert sum("CUDA graph capture of the KV correction failed" in r.message for r in caplog.records) == 1


class _EagerGraphCache(StaticPromptCache):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, correction_backend="eager", **kwargs)


def _fixed_length_questions(tokenizer, n: int, length: int) -> list[list[int]]:
    text = ("The river carries silt to the delta, where farmers plant rice in the wet season and "
            "wheat in the dry one; the town trades both along the coast road to the port. ") * 4
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [ids[i * 7 : i * 7 + length] for i in range(n)]


def test_engine_with_correction_graphs_equals_engine_without(smollm2, monkeypatch):
    agents = [("a", Template.from_system_user("You are agent A.", "Q: {question}\nAnswer:")),
              ("b", Template.from_system_user("You are agent B, a careful one.", "Question: {question}\nReply:"))]
    questions = _fixed_length_questions(smollm2.tokenizer, 6, 12)

    def run():
        eng = KVCommEngine(smollm2.model, smollm2.tokenizer, store=MemoryStore(), fingerprint=smollm2.fingerprint,
                           config=KVCommConfig(max_new_tokens=4, gamma=1.0))
        for name, tmpl in agents:
            eng.register_agent(name, tmpl)
        out = []
        for q in questions:
            content = eng.publish("question", ids=q)
            for name, _ in agents:
                out.append(eng.generate(name, {"question": content}, return_logits=True))
        return eng, out

    _, plain = run()
    monkeypatch.setattr(fastpath_module, "StaticPromptCache", _EagerGraphCache)  # where FastPath builds it
    eng, graphed = run()
    assert eng.fast.buffer.correction is not None and eng.fast.buffer.correction.replays > 0
    # a caller inside torch.inference_mode(): same answers, and the caches still hit (the engine
    # keeps its own tensors out of inference mode, so their version counters work)
    with torch.inference_mode():
        eng_inf, graphed_inf = run()
    assert eng_inf.fast.buffer.correction.replays == eng.fast.buffer.correction.replays
    assert eng_inf.fast.anchor_stacks.hits == eng.fast.anchor_stacks.hits > 0
    for p, g, gi in zip(plain, graphed, graphed_inf, strict=True):
        assert p.mode == g.mode == gi.mode and p.token_ids == g.token_ids == gi.token_ids
        assert torch.equal(p.logits[0], g.logits[0]) and torch.equal(p.logits[0], gi.logits[0])
    assert sum(r.mode == "reuse" for r in graphed) >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ragged", [False, True])
def test_cuda_graph_replay_equals_eager_assemble(ragged):
    lay = Layout(T=37, A=3, seg0=20, seg1=9, anchor_lengths=[37, 41, 39] if ragged else None, device="cuda")
    graphs = AssembleGraphs(4, backend="cuda")
    inv_freq = INV_FREQ.cuda()
    out = KVBlock(torch.zeros(L, H, lay.total, D, device="cuda"), torch.zeros(L, H, lay.total, D, device="cuda"))
    for _ in range(4):
        pieces = lay.pieces(_kv(lay.T, "cuda"))
        graphs.run(pieces, lay.total, inv_freq, CONFIG, correct=True, out=out)
        want = assemble(pieces, lay.total, inv_freq, CONFIG, correct=True)
        torch.cuda.synchronize()
        assert torch.equal(out.k, want.k) and torch.equal(out.v, want.v)
    assert (graphs.captures, graphs.replays) == (1, 3)
