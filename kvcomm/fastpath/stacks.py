"""A slot's anchors stacked as the kernels take them, and a cache that keeps the stacks across calls.

The kernels read a slot's A anchors as one ``[A, L, H, T, D]`` tensor. The store holds each
anchor's base and each delta as its own tensor, so stacking them on every call copies
``A x [L, H, T, D]`` per tensor (bases, placeholder and segment deltas, keys and values) before
the correction starts: more bytes than the correction kernel itself moves. A slot's anchors
change rarely, so :class:`StackCache` builds each stack once and serves it while the store
still returns the very tensors it was built from.

Stacks are right-padded on the token axis: anchor a's ``T_a`` tokens sit at ``[0, T_a)`` of
``[A, L, H, max T_a, D]``. A first-T window is the view ``[:, :, :, :T]``; the last T tokens of
ragged anchors are read by ``channel_weights(anchor_lengths=...)``. Padding is zeros, never read.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from kvcomm.kv import KVBlock
from kvcomm.reuse import stack_blocks

DEFAULT_MAX_BYTES = 2 << 30


class StackCache:
    """Stacks of KV blocks kept across calls, least-recently-used out beyond ``max_bytes``.

    An entry is keyed by the identity of the tensors it was stacked from and remembers them
    weakly, with their version counters: it is served only while the caller passes those same,
    unmodified tensor objects (a MemoryStore returns its stored tensors without a copy). A delta
    re-recorded or a base re-published under the same key is a new tensor, so a stale stack is
    never served, and an entry whose sources were freed (evicted from the store, or a store that
    deserializes on every get) is dropped at the next miss. The stacks' bytes count against
    ``max_bytes`` (the engine's ``KVCommConfig.anchor_cache_bytes``); the sources belong to the
    store. ``max_bytes=0`` disables the cache.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._bytes = 0
        self._lock = threading.Lock()
        # key -> (weak refs to the sources, their versions, the stack)
        self._items: OrderedDict[tuple[int, ...], tuple[list[weakref.ref], list[int | None], KVBlock]] = OrderedDict()

    def stack(self, parts: list[KVBlock]) -> KVBlock:
        """``stack_blocks(parts)``, from the cache while ``parts`` hold the same tensors."""
        if len(parts) == 1 or self.max_bytes <= 0:
            return stack_blocks(parts)  # one anchor: a view, nothing to cache
        srcs = [t for p in parts for t in (p.k, p.v)]
        key = tuple(id(t) for t in srcs)
        with self._lock:
            item = self._items.get(key)
            if item is not None and _same(item, srcs):
                self._items.move_to_end(key)
                self.hits += 1
                return item[2]
        block = stack_blocks(parts)
        with self._lock:
            self.misses += 1
            for k in [k for k, it in self._items.items() if k == key or any(r() is None for r in it[0])]:
                self._drop(k)
            if block.nbytes <= self.max_bytes:
                while self._items and self._bytes + block.nbytes > self.max_bytes:
                    self._drop(next(iter(self._items)))
                self._items[key] = ([weakref.ref(t) for t in srcs], [version_of(t) for t in srcs], block)
                self._bytes += block.nbytes
        return block

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[2].nbytes


def _same(item: tuple[list[weakref.ref], list[int | None], KVBlock], srcs: list[torch.Tensor]) -> bool:
    refs, versions, _ = item
    return all(r() is t and v is not None and v == version_of(t) for r, v, t in zip(refs, versions, srcs, strict=True))


def version_of(t: torch.Tensor) -> int | None:
    """``t``'s version counter (it moves on every in-place write); None for an inference tensor.

    Tensors made under ``torch.inference_mode()`` have no version counter, so an in-place write
    to one cannot be detected: callers must treat None as "may have changed" and never reuse what
    they derived from it.
    """
    return None if t.is_inference() else t._version
