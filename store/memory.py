"""MemoryStore: an in-process tier on CPU or GPU memory, LRU under a byte budget."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from kvcomm.errors import StoreError
from kvcomm.store.base import KVStore, check_key
from kvcomm.store.entry import KVEntry
from kvcomm.store.spec import DEFAULT_MAX_BYTES, MemorySpec


class MemoryStore(KVStore):
    """Entries held as tensors on ``device``, evicted least-recently-used beyond ``max_bytes``.

    The tensors of all entries never total more than ``max_bytes``; an entry larger than
    ``max_bytes`` is not stored (``put`` returns False, fault ``oversize``). ``put`` copies the
    tensors onto ``device``, ``get`` returns the stored tensors without a copy (treat them as
    read-only). Pool maps and records are kept beside the entries, outside the byte budget. Nothing
    is shared across processes: put a RedisStore behind it in a TieredStore for that.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (the GPU tier).
        max_bytes: byte budget of the entries' tensors.
        namespace: key namespace (the ``kvcomm:<namespace>:`` prefix of :mod:`kvcomm.keys`).
        ttl: default seconds to live of an entry (None or 0: no expiry).
    """

    kind = "memory"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        namespace: str = "default",
        ttl: float | None = None,
    ) -> None:
        super().__init__(namespace)
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise StoreError(f"bad memory store device {device!r}: {exc}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise StoreError(f"memory store device {device!r}: CUDA is not available")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise StoreError(f"memory store max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, tuple[KVEntry, int, float | None]] = OrderedDict()
        self._bytes = 0
        self._maps: dict[str, dict[str, str]] = {}
        self._records: dict[str, list[str]] = {}
        self.evictions = 0

    @classmethod
    def from_spec(cls, spec: MemorySpec) -> MemoryStore:
        """The store a ``memory://`` URL describes (:func:`kvcomm.store.url.parse_store_url`)."""
        return cls(spec.device, spec.max_bytes, namespace=spec.namespace, ttl=spec.ttl)

    # -- entries -------------------------------------------------------------------------------
    def get(self, key: str, *, fingerprint: str | None = None) -> KVEntry | None:
        check_key(key)
        with self._lock:
            item = self._live(key)
            if item is not None:
                self._entries.move_to_end(key)
        if item is None:
            self.counters.miss()
            return None
        entry, nbytes, _ = item
        if fingerprint is not None and entry.fingerprint != fingerprint:
            self._fault("fingerprint_mismatch", f"{key!r} has fingerprint {entry.fingerprint!r}, expected {fingerprint!r}")
            self.counters.miss()
            return None
        self.counters.hit(nbytes)
        return entry

    def put(self, key: str, entry: KVEntry, *, ttl: float | None = None) -> bool:
        check_key(key)
        nbytes = entry.nbytes
        if nbytes > self.max_bytes:
            self._fault("oversize", f"{key!r} holds {nbytes} bytes, over max_bytes={self.max_bytes}")
            self.counters.put_failed()
            with self._lock:  # the old value is stale now
                self._drop(key)
            return False
        stored = entry.to(self.device)
        ttl = self.ttl if ttl is None else ttl
        expires = time.monotonic() + ttl if ttl else None
        with self._lock:
            self._drop(key)
            while self._entries and self._bytes + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = (stored, nbytes, expires)
            self._bytes += nbytes
        self.counters.put(nbytes)
        return True

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            found = self._live(key) is not None
            self._drop(key)
            found |= self._maps.pop(key, None) is not None
            found |= self._records.pop(key, None) is not None
        return found

    def contains(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return self._live(key) is not None or key in self._maps or key in self._records

    def scan(self, prefix: str = "") -> list[str]:
        with self._lock:
            for key in [k for k, (_, _, exp) in self._entries.items() if exp is not None]:
                self._live(key)
            keys = set(self._entries) | set(self._maps) | set(self._records)
        return sorted(k for k in keys if k.startswith(prefix))

    def clear(self, prefix: str = "") -> int:
        keys = self.scan(prefix)
        with self._lock:
            for key in keys:
                self._drop(key)
                self._maps.pop(key, None)
                self._records.pop(key, None)
        return len(keys)

    def _live(self, key: str) -> tuple[KVEntry, int, float | None] | None:
        item = self._entries.get(key)
        if item is not None and item[2] is not None and item[2] <= time.monotonic():
            self._drop(key)
            return None
        return item

    def _drop(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            self._bytes -= item[1]

    # -- anchor-pool state and records ------------------------------------------------------------
    def pool_read(self, key: str) -> dict[str, str]:
        check_key(key)
        with self._lock:
            return dict(self._maps.get(key, {}))

    def pool_write(self, key: str, mapping: dict[str, str | int | float]) -> bool:
        check_key(key)
        with self._lock:
            self._maps.setdefault(key, {}).update({str(f): str(v) for f, v in mapping.items()})
        return True

    def pool_remove(self, key: str, *fields: str) -> int:
        check_key(key)
        with self._lock:
            fields_of = self._maps.get(key, {})
            n = sum(fields_of.pop(f, None) is not None for f in fields)
            if key in self._maps and not fields_of:
                del self._maps[key]
            return n

    def pool_increment(self, key: str, field: str, amount: int = 1) -> int | None:
        check_key(key)
        with self._lock:
            fields_of = self._maps.setdefault(key, {})
            try:
                value = int(fields_of.get(field, "0")) + int(amount)
            except ValueError:
                raise StoreError(f"pool map {key!r} field {field!r} is not an integer") from None
            fields_of[field] = str(value)
            return value

    def append_record(self, key: str, record: dict[str, Any]) -> bool:
        check_key(key)
        try:
            line = json.dumps(record)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"record for {key!r} is not JSON-serializable: {exc}") from None
        with self._lock:
            self._records.setdefault(key, []).append(line)
        return True

    def read_records(self, key: str) -> list[dict[str, Any]]:
        check_key(key)
        with self._lock:
            lines = list(self._records.get(key, []))
        return [json.loads(line) for line in lines]

    # -- housekeeping ------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        with self._lock:
            return {"keys": len(self.scan()), "entries": len(self._entries), "entry_bytes": self._bytes}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            extra = {
                "device": str(self.device),
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "evictions": self.evictions,
            }
        return {**super().stats(), **extra}

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._maps.clear()
            self._records.clear()
            self._bytes = 0

