"""Anchor stacks: right-padded layout, and the cache that serves a stack only for the same tensors."""

from __future__ import annotations

import gc

import torch

from kvcomm.fastpath.stacks import StackCache
from kvcomm.kv import KVBlock
from kvcomm.reuse import SlotAnchors, pad_stack, stack_blocks


def _block(n: int, L: int = 2, H: int = 3, D: int = 8) -> KVBlock:
    return KVBlock(torch.randn(L, H, n, D), torch.randn(L, H, n, D))


def test_pad_stack_right_pads_ragged_and_views_one() -> None:
    xs = [torch.randn(2, 3, n, 8) for n in (5, 7, 6)]
    s = pad_stack(xs)
    assert s.shape == (3, 2, 3, 7, 8)
    for a, x in enumerate(xs):
        assert torch.equal(s[a, :, :, : x.shape[2]], x)
        assert not s[a, :, :, x.shape[2] :].any()
    one = pad_stack(xs[:1])
    assert one.shape == (1, 2, 3, 5, 8) and one.data_ptr() == xs[0].data_ptr()  # a view, no copy


def test_slot_anchor_stacks_lengths_only_when_ragged() -> None:
    same = SlotAnchors([_block(6), _block(6)], [_block(6), _block(6)], [_block(4), _block(4)])
    assert same.stacks().lengths is None and same.stacks().base is not None
    ragged = SlotAnchors([_block(6), _block(9)], [_block(6), _block(9)], [_block(4), _block(4)])
    st = ragged.stacks()
    assert st.lengths == [6, 9] and st.base is not None and st.base.k.shape[3] == 9
    exact = SlotAnchors([_block(6)], [_block(6)], [_block(4)], exact=True)
    assert exact.stacks().base is None


def test_cache_hits_for_the_same_tensors_only() -> None:
    cache = StackCache(1 << 20)
    parts = [_block(5), _block(7)]
    first = cache.stack(parts)
    assert cache.stack(list(parts)) is first and cache.hits == 1
    assert torch.equal(first.k, stack_blocks(parts).k)
    # a re-recorded tensor (same values, new object) is a miss, never the old stack
    again = [parts[0], KVBlock(parts[1].k.clone(), parts[1].v)]
    assert cache.stack(again) is not first and cache.misses == 2
    # an in-place write to a source is a miss too
    parts[0].k.add_(1.0)
    fresh = cache.stack(parts)
    assert fresh is not first and torch.equal(fresh.k, stack_blocks(parts).k)


def test_cache_obeys_its_byte_budget_and_forgets_freed_sources() -> None:
    one = stack_blocks([_block(4), _block(4)]).nbytes
    cache = StackCache(2 * one)
    keep = [[_block(4), _block(4)] for _ in range(3)]
    for parts in keep:
        cache.stack(parts)
    assert len(cache) == 2 and cache.nbytes == 2 * one  # least recently used went out
    cache.stack(keep[0])
    assert cache.misses == 4  # keep[0] had been evicted
    del keep, parts
    gc.collect()
    cache.stack([_block(4), _block(4)])
    assert len(cache) == 1  # entries whose sources were freed are dropped at the next miss
    assert StackCache(0).stack([_block(4), _block(4)]) is not None  # disabled: stacks every call


def test_inference_tensors_are_never_served_from_the_cache() -> None:
    # an inference tensor has no version counter: an in-place write to it cannot be seen, so a
    # stack built from one is rebuilt on every call (correct, never stale)
    with torch.inference_mode():
        parts = [_block(5), _block(7)]
    cache = StackCache(1 << 20)
    first = cache.stack(parts)
    with torch.inference_mode():
        parts[0].k.add_(1.0)
    second = cache.stack(parts)
    assert second is not first and cache.hits == 0
    assert torch.equal(second.k, stack_blocks(parts).k)
