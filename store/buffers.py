"""Receive buffers: the memory a large Redis reply is read into, reused once nothing refers to it.

A reply is received straight into its final buffer (:mod:`kvcomm.store.wire`), and an entry decoded
on the CPU is a set of views of that buffer (:func:`kvcomm.store.codec.decode` with ``owned=True``):
the bytes are copied once, by the kernel, from the socket. Fresh memory is slow to fill, though: on
the 2-core machine this was written on, receiving into new pages ran at ~0.6 GB/s and into pages
already touched at ~0.9 GB/s (the kernel zeroes and maps every new page). So :class:`BufferPool`
keeps the buffers of large replies and hands one out again when no tensor (or memoryview) refers to
it anymore, which its reference count tells.

For a CUDA device the buffers are pinned host tensors instead (copies to the device then run
asynchronously); torch's own pinned-memory cache reuses them once their copies are done.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, cast

import torch

#: replies smaller than this are read into plain new buffers (malloc reuses small blocks anyway)
MIN_POOLED = 1 << 20
#: default bytes of buffers a pool keeps (in use or free)
DEFAULT_POOL_BYTES = 512 << 20


def _size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to a step of 1/8 of its power of two (at least 1 MiB): <= 12.5% unused."""
    step = max(MIN_POOLED, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // step) * step


class BufferPool:
    """Buffers for received values: new ones, or pooled ones nothing refers to anymore.

    Args:
        max_bytes: bytes of buffers the pool keeps track of (0: no pooling). A buffer still in use
            counts too; past the limit, free buffers are dropped, oldest first, and a new buffer
            that still does not fit is handed out without being kept.
        pin: hand out pinned host tensors (for copies to a CUDA device); falls back to ordinary
            memory where pinning is unavailable.
    """

    def __init__(self, max_bytes: int = DEFAULT_POOL_BYTES, *, pin: bool = False) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.pin = bool(pin) and torch.cuda.is_available()
        self._lock = threading.Lock()
        self._buffers: list[bytearray] = []  # oldest first
        self._bytes = 0
        self.reused = 0
        self.allocated = 0

    def take(self, nbytes: int) -> bytearray | torch.Tensor:
        """A writable buffer of at least ``nbytes`` bytes that nothing else uses.

        A bytearray, or a 1-D pinned uint8 tensor when the pool pins. Receive into
        ``memoryview(buf)[:nbytes]`` (a pinned tensor: ``memoryview(buf.numpy())``).
        """
        if self.pin:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # no driver after all: ordinary memory still works
                self.pin = False
        if nbytes < MIN_POOLED or not self.max_bytes:
            return bytearray(nbytes)
        size = _size_class(nbytes)
        with self._lock:
            for i in range(len(self._buffers)):
                if len(self._buffers[i]) == size and self._free(i):
                    buf = self._buffers.pop(i)
                    self._buffers.append(buf)  # most recently used last
                    self.reused += 1
                    return buf
            self.allocated += 1
            buf = bytearray(size)
            while self._buffers and self._bytes + size > self.max_bytes and self._drop_free():
                pass
            if self._bytes + size <= self.max_bytes:
                self._buffers.append(buf)
                self._bytes += size
            return buf

    def _free(self, i: int) -> bool:
        """Whether nothing but the pool refers to buffer ``i``: referrers are the list and
        getrefcount's argument; a memoryview or a tensor made from the buffer holds one more."""
        return sys.getrefcount(self._buffers[i]) <= 2

    def _drop_free(self) -> bool:
        for i in range(len(self._buffers)):
            if self._free(i):
                self._bytes -= len(self._buffers.pop(i))
                return True
        return False

    def stats(self) -> dict[str, int]:
        with self._lock:
            free = sum(self._free(i) for i in range(len(self._buffers)))
            return {"buffers": len(self._buffers), "free": free, "bytes": self._bytes, "reused": self.reused,
                    "allocated": self.allocated}

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._bytes = 0


def writable(buf: bytearray | torch.Tensor) -> memoryview:
    """A writable byte view of a buffer from :meth:`BufferPool.take`."""
    return memoryview(cast(Any, buf.numpy())) if isinstance(buf, torch.Tensor) else memoryview(buf)


__all__ = ["DEFAULT_POOL_BYTES", "MIN_POOLED", "BufferPool", "writable"]
