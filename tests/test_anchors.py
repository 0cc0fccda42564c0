"""kvcomm.anchors: the shareability test, use counts and eviction of one slot's pool (no model)."""

from __future__ import annotations

import torch

from kvcomm.anchors import AnchorPool
from kvcomm.config import KVCommConfig
from kvcomm.keys import PoolKey
from kvcomm.store import MemoryStore

MODEL = "0123456789abcdef"


def _pool(**config) -> tuple[AnchorPool, MemoryStore]:
    store = MemoryStore()
    return AnchorPool(store, MODEL, "question", KVCommConfig(**config)), store


def _values(seed: int, T: int = 6) -> torch.Tensor:
    return torch.randn(2, 2, T, 4, generator=torch.Generator().manual_seed(seed))  # [L, H, T, D]


def test_too_few_candidates_make_a_new_anchor() -> None:
    pool, _ = _pool(min_anchors=2)
    decision = pool.decide("c", _values(0), {"a": _values(1)})
    assert decision.new_anchor and decision.reason == "too few anchors"


def test_a_clear_nearest_anchor_is_shared_and_counted() -> None:
    pool, store = _pool(gamma=0.3)
    for h in ("near", "far"):
        pool.add(h, 6)
    content = _values(0)
    decision = pool.decide("c", content, {"near": content + 1e-3, "far": content + 10.0})
    assert not decision.new_anchor and decision.reason == "shareable"
    assert decision.matched == ("near",) and decision.entropy < 0.01
    assert {a.content_hash: a.uses for a in pool.anchors()} == {"near": 1, "far": 0}
    assert store.pool_read(str(PoolKey(MODEL, "question", "uses"))) == {"near": "1"}


def test_equidistant_anchors_have_high_entropy_and_make_a_new_anchor() -> None:
    pool, _ = _pool(gamma=0.3)
    content = _values(0)
    decision = pool.decide("c", content, {"a": content + 1.0, "b": content - 1.0})
    assert decision.new_anchor and decision.reason == "entropy"
    assert abs(decision.entropy - 1.0) < 1e-6  # two equal weights: one bit


def test_an_existing_anchor_is_never_tested_again() -> None:
    pool, _ = _pool()
    assert pool.decide("a", _values(0), {"a": _values(0), "b": _values(1)}).reason == "already an anchor"


def test_shorter_anchor_distance_is_scaled_to_the_content_length() -> None:
    pool, _ = _pool(gamma=0.3, min_anchor_coverage=0.5)
    content = _values(0, T=8)
    # the same per-token difference over 4 of 8 tokens must weigh like it held for all 8
    short = content[:, :, :4] + 1.0
    full = content + 1.0
    decision = pool.decide("c", content, {"short": short, "full": full})
    assert decision.new_anchor and decision.reason == "entropy" and abs(decision.entropy - 1.0) < 1e-5


def test_eviction_obeys_capacity_and_window() -> None:
    pool, store = _pool(max_anchors=3, eviction_window=2)
    for h in ("a", "b", "c"):
        assert pool.add(h, 5) == []
    store.pool_increment(str(PoolKey(MODEL, "question", "uses")), "a", 3)  # 'a' is oldest but used
    assert pool.add("d", 5) == ["b"]  # least used among the 2 oldest (a, b)
    assert [x.content_hash for x in pool.anchors()] == ["a", "c", "d"]
    assert pool.add("e", 5) == ["c"]
    assert len(pool.anchors()) == 3 and "e" in pool and "c" not in pool


def test_malformed_members_are_ignored() -> None:
    pool, store = _pool()
    pool.add("good", 5)
    store.pool_write(str(PoolKey(MODEL, "question")), {"bad": "not-a-pair"})
    assert [a.content_hash for a in pool.anchors()] == ["good"]
