"""The entries of a RedisStore: reads (one pipelined batch per server), writes, the fetch budget.

:class:`EntryIO` is the half of :class:`~kvcomm.store.RedisStore` that reads and writes entries
(:mod:`kvcomm.store.codec`): each entry is one Redis string written by one ``SET`` (header and
payload in one value), or, when larger than ``chunk_bytes``, chunk keys and then a manifest under
its key (:mod:`kvcomm.store.chunks`). Reads go out as one pipelined batch per server with
``GETRANGE`` capped at ``max_entry_bytes`` + 1, are received into reused buffers, and are charged
to the optional fetch budget (``max_fetch_bytes`` per ``fetch_window`` seconds). Every fault is a
miss (``get`` -> None, ``put`` -> False) with a warning and a counter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis
import torch

from kvcomm.errors import EntryFormatError
from kvcomm.store import chunks
from kvcomm.store.base import check_key
from kvcomm.store.buffers import writable
from kvcomm.store.codec import decode, encode
from kvcomm.store.entry import KVEntry
from kvcomm.store.nodes import Node
from kvcomm.store.redis_io import Read, ServerIO


class EntryIO(ServerIO):
    """Entry reads and writes of a store on Redis servers (mixed into RedisStore).

    The store provides the options below (set from its :class:`~kvcomm.store.spec.RedisSpec`), the
    fetch-budget state, ``_full`` (a key under the namespace prefix) and what
    :class:`~kvcomm.store.redis_io.ServerIO` needs.
    """

    namespace: str
    ttl: float | None
    codec: str
    device: torch.device
    max_entry_bytes: int
    max_fetch_bytes: int | None
    fetch_window: float
    chunk_bytes: int
    _secret: bytes | None
    _prefix: str
    _budget_lock: threading.Lock
    _window_start: float
    _fetched: int
    _full: Callable[[str], str]

    # -- reads ---------------------------------------------------------------------------------
    def get(self, key: str, *, fingerprint: str | None = None) -> KVEntry | None:
        check_key(key)
        cap = self._budget_left()
        if cap <= 0:
            self._fault("budget", f"GET {key!r}: the fetch budget of {self.max_fetch_bytes} bytes per "
                                  f"{self.fetch_window:g} s is spent")
            self.counters.miss()
            return None
        return self._get_entries([key], fingerprint, cap)[0]

    def get_many(self, keys: Sequence[str], *, fingerprint: str | None = None) -> list[KVEntry | None]:
        """The entries under ``keys`` in one pipelined round trip per server (chunked entries: one
        more for their chunks). With a fetch budget, one key at a time (the budget is exact)."""
        keys = list(keys)
        for key in keys:
            check_key(key)
        if self.max_fetch_bytes is not None:
            return [self.get(key, fingerprint=fingerprint) for key in keys]
        return self._get_entries(keys, fingerprint, self.max_entry_bytes) if keys else []

    def _get_entries(self, keys: list[str], fingerprint: str | None, cap: int) -> list[KVEntry | None]:
        fulls = [self._prefix + key for key in keys]
        what = f"GET {keys[0]!r}" if len(keys) == 1 else f"GET of {len(keys)} keys"
        reads = self._read_values(fulls, [cap] * len(keys), what)
        out: list[KVEntry | None] = [None] * len(keys)
        sizes = [read.length for read in reads]
        manifests: dict[int, chunks.Manifest] = {}
        for i, (key, read) in enumerate(zip(keys, reads, strict=True)):
            if read.fault is not None:
                self._fault(*read.fault)
                continue
            if read.length == 0:  # a missing key
                continue
            self._charge(read.length)
            if read.length > cap and cap < self.max_entry_bytes:
                self._fault("budget", f"GET {key!r}: the value is larger than the {cap} bytes left of the fetch "
                                      f"budget ({self.max_fetch_bytes} bytes per {self.fetch_window:g} s)")
                continue
            if read.buffer is not None and chunks.is_manifest(read.blob()[:4]):
                try:
                    manifest = chunks.parse(read.blob(), max_total=self.max_entry_bytes)
                except EntryFormatError as exc:
                    self._fault(exc.kind, f"entry {key!r}: {exc}")
                    continue
                if manifest.total > cap:
                    self._fault("budget", f"GET {key!r}: the chunked entry of {manifest.total} bytes is larger than "
                                          f"the {cap} bytes left of the fetch budget")
                    continue
                manifests[i] = manifest
                continue
            out[i] = self._decode(key, read, fingerprint)
        if manifests:
            for i, read in self._read_chunked({i: (keys[i], m) for i, m in manifests.items()}).items():
                if read.fault is not None:
                    self._fault(*read.fault)
                    continue
                self._charge(read.length)
                sizes[i] = read.length
                out[i] = self._decode(keys[i], read, fingerprint)
        for entry, size in zip(out, sizes, strict=True):
            if entry is None:
                self.counters.miss()
            else:
                self.counters.hit(size)
        return out

    def _decode(self, key: str, read: Read, fingerprint: str | None) -> KVEntry | None:
        if read.buffer is None:  # longer than max_entry_bytes: dropped unread
            self._fault("oversize", f"entry {key!r}: value of more than {self.max_entry_bytes} bytes is over "
                                    f"max_entry_bytes")
            return None
        try:
            entry = decode(read.blob(), namespace=self.namespace, key=key, fingerprint=fingerprint,
                           max_entry_bytes=self.max_entry_bytes, device=self.device, secret=self._secret, owned=True)
        except EntryFormatError as exc:
            self._fault(exc.kind, f"entry {key!r}: {exc}")
            return None
        if self.device.type == "cuda":  # the copies from the pinned buffer are done before it is reused
            torch.cuda.current_stream(self.device).synchronize()
        return entry

    def _read_chunked(self, wanted: dict[int, tuple[str, chunks.Manifest]]) -> dict[int, Read]:
        """Every chunk of every manifest in one batch per server, each into its place in one buffer."""
        out = {i: Read(length=m.total, buffer=self._buffers.take(m.total)) for i, (_, m) in wanted.items()}
        fulls, caps, places = [], [], []
        for i, (key, manifest) in wanted.items():
            for c in range(manifest.count):
                start, stop = manifest.span(c)
                fulls.append(self._prefix + manifest.key(key, c))
                caps.append(stop - start)  # GETRANGE 0 cap: one byte more than a chunk may hold
                places.append((i, start, stop, c))

        def into(j: int, n: int) -> memoryview | None:
            i, start, stop, _ = places[j]
            buffer = out[i].buffer
            return writable(buffer)[start:stop] if buffer is not None and n == stop - start else None

        reads = self._read_values(fulls, caps, f"GET chunks of {len(wanted)} entries", sink=into)
        for (i, start, stop, c), read in zip(places, reads, strict=True):
            if out[i].fault is not None:
                continue
            key, manifest = wanted[i]
            where = f"entry {key!r}: chunk {c} of {manifest.count}"
            if read.fault is not None:
                out[i].fault = (read.fault[0], f"{where}: {read.fault[1]}")
            elif read.length == 0:
                out[i].fault = ("truncated", f"{where} is missing (evicted or expired)")
            elif read.length != stop - start:
                kind = "truncated" if read.length < stop - start else "corrupt"
                out[i].fault = (kind, f"{where} holds {read.length} bytes, the manifest says {stop - start}")
        for read in out.values():
            if read.fault is not None:
                read.buffer = None
        return out

    # -- writes --------------------------------------------------------------------------------
    def put(self, key: str, entry: KVEntry, *, ttl: float | None = None) -> bool:
        full = self._full(key)
        if entry.nbytes > 2 * self.max_entry_bytes:  # skip quantizing what cannot fit anyway
            return self._reject(key, entry.nbytes)
        blob = encode(entry, namespace=self.namespace, key=key, codec=self.codec, secret=self._secret)
        if len(blob) > self.max_entry_bytes:
            return self._reject(key, len(blob))
        ttl = self.ttl if ttl is None else ttl
        px = max(1, int(ttl * 1000)) if ttl else None
        manifest = None
        if len(blob) > self.chunk_bytes:
            manifest = chunks.plan(len(blob), self.chunk_bytes, blob[:8])
            if not self._put_chunks(key, manifest, memoryview(blob), px):
                self.counters.put_failed()
                return False
        value = manifest.encode() if manifest is not None else blob
        old = self._on_key(full, f"SET {key!r}", lambda c: self._swap(c, full, value, px), None)
        if old is None:
            if manifest is not None:
                self._unlink(self._chunk_fulls(key, manifest), f"UNLINK chunks of {key!r}")
            self.counters.put_failed()
            return False
        self._drop_old_chunks(key, old, keep=manifest)
        self.counters.put(len(blob))
        return True

    @staticmethod
    def _swap(client: redis.Redis, full: str, value: bytes | bytearray, px: int | None) -> bytes:
        """Set ``full`` and return the start of its old value (a manifest names chunks to drop)."""
        pipe = client.pipeline(transaction=True)
        pipe.getrange(full, 0, chunks.MANIFEST_MAX_BYTES - 1)
        pipe.set(full, value, px=px)
        head, _ = pipe.execute()
        return cast(bytes, head)

    def _chunk_fulls(self, key: str, manifest: chunks.Manifest) -> list[str]:
        return [self._prefix + k for k in manifest.keys(key)]

    def _drop_old_chunks(self, key: str, head: bytes, keep: chunks.Manifest | None = None) -> None:
        if not chunks.is_manifest(head):
            return
        try:
            old = chunks.parse(head, max_total=1 << 62)
        except EntryFormatError:
            return
        if keep is None or old.generation != keep.generation:
            self._unlink(self._chunk_fulls(key, old), f"UNLINK old chunks of {key!r}")

    def _put_chunks(self, key: str, manifest: chunks.Manifest, view: memoryview, px: int | None) -> bool:
        """Write every chunk (one batch per server, all at once); False (and none left) on a fault."""
        fulls = self._chunk_fulls(key, manifest)
        what = f"SET chunks of {key!r}"
        groups = self._route(fulls, what)
        if groups is None:
            return False
        expiry: tuple[Any, ...] = ("PX", px) if px else ()
        work: dict[Node, tuple[list[tuple[Any, ...]], list[Any]]] = {}
        for node, idx in groups.items():
            commands: list[tuple[Any, ...]] = []
            for c in idx:
                start, stop = manifest.span(c)
                commands.append(("SET", fulls[c], view[start:stop], *expiry))
            work[node] = (commands, [None] * len(commands))
        ok = True
        for node, result in self._exchange(work, what).items():
            if isinstance(result, tuple):
                self._fault(*result)
                ok = False
                continue
            for reply in result:
                if reply.kind == "error":
                    self._fault(*self._reply_fault(node, reply, what))
                    ok = False
                    break
        if not ok:
            self._unlink(fulls, f"UNLINK chunks of {key!r}")
        return ok

    def _reject(self, key: str, nbytes: int) -> bool:
        self._fault("oversize", f"entry {key!r} of {nbytes} bytes is over max_entry_bytes={self.max_entry_bytes}")
        self.counters.put_failed()
        self.delete(key)  # drop the stale one
        return False

    def delete(self, key: str) -> bool:
        full = self._full(key)

        def run(client: redis.Redis) -> tuple[bytes, int]:
            pipe = client.pipeline(transaction=True)
            pipe.getrange(full, 0, chunks.MANIFEST_MAX_BYTES - 1)
            pipe.unlink(full)
            head, n = pipe.execute()
            return cast(bytes, head), int(n)

        head, removed = self._on_key(full, f"UNLINK {key!r}", run, (b"", 0))
        self._drop_old_chunks(key, head)
        return bool(removed)

    # -- fetch budget ----------------------------------------------------------------------------------
    def _budget_left(self) -> int:
        """Bytes this get may read: max_entry_bytes, or less when the fetch budget is nearly spent."""
        if self.max_fetch_bytes is None:
            return self.max_entry_bytes
        with self._budget_lock:
            now = time.monotonic()
            if now - self._window_start >= self.fetch_window:
                self._window_start, self._fetched = now, 0
            return min(self.max_entry_bytes, self.max_fetch_bytes - self._fetched)

    def _charge(self, nbytes: int) -> None:
        if self.max_fetch_bytes is not None:
            with self._budget_lock:
                self._fetched += nbytes


__all__ = ["EntryIO"]
