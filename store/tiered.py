"""TieredStore: fast tiers in front of slow ones (GPU memory -> Redis), read-through, write-through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcomm.errors import StoreError
from kvcomm.store.base import KVStore
from kvcomm.store.entry import KVEntry


class TieredStore(KVStore):
    """Stores ordered fastest first, e.g. ``TieredStore([MemoryStore("cuda", 8 << 30), RedisStore(url)])``.

    - ``get`` asks each tier in order; a hit in tier ``i`` is copied into tiers ``0..i-1``
      (promotion) and returned from the fastest tier that took it (on its device).
    - ``get_many`` does the same for a batch: the fastest tier answers what it holds, and only
      the keys it lacks go, as one batch, to the next tier (one round trip to a Redis tier).
    - ``put`` writes every tier; True if at least one tier stored the entry.
    - ``delete``/``clear`` act on every tier; ``contains``/``scan`` see the union.
    - Anchor-pool state and records live in the **last** tier only: it is the one other
      processes share, so an atomic ``pool_increment`` there is the truth (a cached count would
      go stale).

    Tier faults are counted by the tiers themselves (``stats()["tiers"]``); the tiered counters
    count hits (found in any tier), misses (found in none) and promotions.
    """

    kind = "tiered"

    def __init__(self, tiers: Sequence[KVStore]) -> None:
        tiers = list(tiers)
        if not tiers or not all(isinstance(t, KVStore) for t in tiers):
            raise StoreError("TieredStore needs a non-empty list of KVStore tiers, fastest first")
        namespaces = {t.namespace for t in tiers}
        if len(namespaces) > 1:
            raise StoreError(f"tiers of one TieredStore must share a namespace, got {sorted(namespaces)}")
        super().__init__(tiers[0].namespace)
        self.tiers = tiers
        self.promotions = 0

    @property
    def shared(self) -> KVStore:
        """The last tier: the one holding anchor-pool state and records."""
        return self.tiers[-1]

    def get(self, key: str, *, fingerprint: str | None = None) -> KVEntry | None:
        for i, tier in enumerate(self.tiers):
            entry = tier.get(key, fingerprint=fingerprint)
            if entry is None:
                continue
            self.counters.hit(entry.nbytes)
            for faster in reversed(self.tiers[:i]):
                if faster.put(key, entry):
                    self.promotions += 1
                    promoted = faster.get(key, fingerprint=fingerprint)
                    entry = promoted if promoted is not None else entry
            return entry
        self.counters.miss()
        return None

    def get_many(self, keys: Sequence[str], *, fingerprint: str | None = None) -> list[KVEntry | None]:
        keys = list(keys)
        out: list[KVEntry | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for i, tier in enumerate(self.tiers):
            if not todo:
                break
            found = tier.get_many([keys[j] for j in todo], fingerprint=fingerprint)
            hits = [(j, entry) for j, entry in zip(todo, found, strict=True) if entry is not None]
            todo = [j for j, entry in zip(todo, found, strict=True) if entry is None]
            for faster in reversed(self.tiers[:i]):
                promoted = [j for j, entry in hits if faster.put(keys[j], entry)]
                self.promotions += len(promoted)
                again = dict(zip(promoted, faster.get_many([keys[j] for j in promoted], fingerprint=fingerprint),
                                 strict=True))
                hits = [(j, again.get(j) or entry) for j, entry in hits]
            for j, entry in hits:
                out[j] = entry
                self.counters.hit(entry.nbytes)
        for _ in todo:
            self.counters.miss()
        return out

    def put(self, key: str, entry: KVEntry, *, ttl: float | None = None) -> bool:
        results = [tier.put(key, entry, ttl=ttl) for tier in reversed(self.tiers)]  # shared first
        if any(results):
            self.counters.put(entry.nbytes)
            return True
        self.counters.put_failed()
        return False

    def delete(self, key: str) -> bool:
        return any([tier.delete(key) for tier in self.tiers])

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def scan(self, prefix: str = "") -> list[str]:
        return sorted(set().union(*(tier.scan(prefix) for tier in self.tiers)))

    def clear(self, prefix: str = "") -> int:
        keys = self.scan(prefix)
        for tier in self.tiers:
            tier.clear(prefix)
        return len(keys)

    def pool_read(self, key: str) -> dict[str, str]:
        return self.shared.pool_read(key)

    def pool_read_many(self, keys: Sequence[str]) -> list[dict[str, str]]:
        return self.shared.pool_read_many(keys)

    def pool_write(self, key: str, mapping: dict[str, str | int | float]) -> bool:
        return self.shared.pool_write(key, mapping)

    def pool_remove(self, key: str, *fields: str) -> int:
        return self.shared.pool_remove(key, *fields)

    def pool_increment(self, key: str, field: str, amount: int = 1) -> int | None:
        return self.shared.pool_increment(key, field, amount)

    def append_record(self, key: str, record: dict[str, Any]) -> bool:
        return self.shared.append_record(key, record)

    def read_records(self, key: str) -> list[dict[str, Any]]:
        return self.shared.read_records(key)

    def ping(self) -> None:
        for tier in self.tiers:
            tier.ping()

    def usage(self) -> dict[str, Any]:
        return self.shared.usage()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["promotions"] = self.promotions
        out["faults"] = {k: sum(t.stats()["faults"][k] for t in self.tiers) for k in out["faults"]}
        out["tiers"] = [tier.stats() for tier in self.tiers]
        for name in ("signed", "integrity"):  # what the shared tier accepts is what other processes can inject
            if name in out["tiers"][-1]:
                out[name] = out["tiers"][-1][name]
        return out

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
