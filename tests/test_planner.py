"""kvcomm.planner: plans, the anchors a plan reads, pieces and recorded deltas (synthetic KV, no model)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvcomm.config import KVCommConfig
from kvcomm.keys import DeltaKey
from kvcomm.kv import KVBlock
from kvcomm.planner import Planner
from kvcomm.prompt import AgentPrompt, Content
from kvcomm.rope import shift_keys
from kvcomm.store import MemoryStore
from kvcomm.template import RenderedTemplate, Template

MODEL = "0123456789abcdef"
L, H, D = 2, 2, 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
SEGMENTS = ((1, 2, 3), (4, 5))  # seg_0 {question} seg_1
DUMMY = 2  # tokens of the dummy slot text at registration


def _kv(T: int, seed: int) -> KVBlock:
    g = torch.Generator().manual_seed(seed)
    return KVBlock(torch.randn(L, H, T, D, generator=g), torch.randn(L, H, T, D, generator=g))


def _agent(name: str = "solver") -> AgentPrompt:
    rendered = RenderedTemplate(slots=("question",), segment_ids=SEGMENTS, segment_texts=("a", "b"))
    block = _kv(len(SEGMENTS[0]) + DUMMY + len(SEGMENTS[1]), seed=1)
    return AgentPrompt(name, Template("{question}"), rendered, block, [0, len(SEGMENTS[0]) + DUMMY])


def _content(seed: int, T: int = 4) -> Content:
    return Content("question", tuple(range(10, 10 + T)), f"{seed:024x}", _kv(T, seed))


def _planner(**config) -> Planner:
    return Planner(MemoryStore(), MODEL, MODEL + "00000000", KVCommConfig(**config), torch.device("cpu"), INV_FREQ)


def _layout(content: Content) -> tuple[list[int], list[int], int]:
    q = len(SEGMENTS[0])
    return [0, q + content.length], [q], q + content.length + len(SEGMENTS[1])


def _dense_call(planner: Planner, agent: AgentPrompt, content: Content, seed: int) -> KVBlock:
    """Record the deltas of a fake dense call whose real KV is random; returns that KV."""
    seg_starts, slot_starts, total = _layout(content)
    real = _kv(total, seed)
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=real.k[i][None], values=real.v[i][None]) for i in range(L)])
    planner.record_deltas(agent, [content], cache, seg_starts, slot_starts, [0])
    return real


def test_no_anchor_means_dense_and_nothing_recorded() -> None:
    planner, agent, content = _planner(), _agent(), _content(2)
    plan = planner.plan_with_anchors(agent, [content])
    assert plan.mode == "dense" and plan.slot_state == {"question": "shared(0)"} and plan.record_slots == []


def test_a_new_anchor_goes_dense_once_then_is_exact() -> None:
    planner, agent, content = _planner(), _agent(), _content(2)
    planner.store.put(str(planner.content_key(content.hash)), planner.entry({"k": content.kv.k, "v": content.kv.v}, {}))
    assert planner.admit(content).new_anchor
    plan = planner.plan_with_anchors(agent, [content])
    assert (plan.mode, plan.slot_state, plan.record_slots) == ("dense", {"question": "new-anchor"}, [0])
    real = _dense_call(planner, agent, content, seed=3)
    plan = planner.plan_with_anchors(agent, [content])
    assert (plan.mode, plan.slot_state) == ("reuse", {"question": "exact"})
    found = plan.anchors[0]
    assert found is not None and found.exact and len(found) == 1
    # the recorded deltas give back the real KV: R(q)(base + delta_k) and base_v + delta_v
    q = len(SEGMENTS[0])
    k = shift_keys(content.kv.k + found.slot_deltas[0].k, q, INV_FREQ)
    torch.testing.assert_close(k, real.k[:, :, q : q + content.length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(content.kv.v + found.slot_deltas[0].v, real.v[:, :, q : q + content.length])
    assert found.slot_shifts == [q] and found.segment_shifts == [content.length - DUMMY]


def test_a_shareable_content_reads_every_anchor_with_this_agents_deltas() -> None:
    planner, agent = _planner(min_anchors=2), _agent()
    anchors = [_content(s) for s in (2, 3)]
    for a in anchors:
        planner.store.put(str(planner.content_key(a.hash)), planner.entry({"k": a.kv.k, "v": a.kv.v}, {}))
        assert planner.admit(a).new_anchor  # fewer than 2 candidates each time
        _dense_call(planner, agent, a, seed=7)
    newcomer = _content(4)
    plan = planner.plan_with_anchors(agent, [newcomer])
    assert plan.mode == "reuse" and plan.slot_state == {"question": "shared(2)"}
    # another agent has measured nothing: its call goes dense
    assert planner.plan_with_anchors(_agent("critic"), [newcomer]).mode == "dense"


def test_anchors_shorter_than_the_content_are_not_candidates_unless_coverage_allows() -> None:
    short = _content(2, T=2)
    assert not _planner().covers(short.length, 4)
    assert _planner(min_anchor_coverage=0.5).covers(short.length, 4)


def test_pieces_place_every_span_and_its_shift() -> None:
    planner, agent, content = _planner(), _agent(), _content(2)
    seg_starts, slot_starts, _ = _layout(content)
    pieces = planner.pieces(agent, [content], seg_starts, slot_starts, [None])
    assert [(p.start, p.shift, p.kind, p.src.length) for p in pieces] == [
        (0, 0, "seg", 3), (3, 3, "slot", 4), (7, 7 - (3 + DUMMY), "seg", 2)]


def test_eviction_drops_the_evicted_anchors_deltas() -> None:
    planner, agent = _planner(max_anchors=2, eviction_window=1, min_anchors=99), _agent()
    contents = [_content(s) for s in (2, 3, 4)]
    for c in contents[:2]:
        planner.admit(c)
        _dense_call(planner, agent, c, seed=5)
    assert planner.store.contains(str(DeltaKey(MODEL, contents[0].hash, agent.name)))
    planner.admit(contents[2])  # over capacity: the oldest (least used) goes, with its deltas
    assert not planner.store.contains(str(DeltaKey(MODEL, contents[0].hash, agent.name)))
    assert planner.store.contains(str(DeltaKey(MODEL, contents[1].hash, agent.name)))


def test_admitting_a_content_reads_every_candidate_anchor_in_one_batch() -> None:
    """The shareability test reads the candidates' base KV with one get_many (one round trip to
    Redis), not one get per anchor."""
    planner = _planner(min_anchors=2, gamma=1.0)
    for seed in (2, 3, 4):
        a = _content(seed)
        planner.store.put(str(planner.content_key(a.hash)), planner.entry({"k": a.kv.k, "v": a.kv.v}, {}))
        planner.admit(a)
    store, batches, singles = planner.store, [], []
    get, get_many = store.get, store.get_many

    def one(key, **kwargs):
        if not batches or batches[-1] is None:  # a get() of its own, not inside a batch
            singles.append(key)
        return get(key, **kwargs)

    def many(keys, **kwargs):  # MemoryStore answers a batch through get(): mark the batch open
        batches.append(list(keys))
        try:
            return get_many(keys, **kwargs)
        finally:
            batches.append(None)

    store.get, store.get_many = one, many  # type: ignore[method-assign]
    n_anchors = len(planner.pool("question").anchors())
    decision = planner.admit(_content(9))
    reads = [b for b in batches if b is not None]
    assert singles == [] and len(reads) == 1 and len(reads[0]) == n_anchors >= 2
    assert decision.reason in ("shareable", "entropy")
