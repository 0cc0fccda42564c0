"""The anchor-pool maps (Redis hashes) and records (Redis lists) of a RedisStore.

:class:`PoolAndRecordIO` is the part of :class:`~kvcomm.store.RedisStore` that keeps the
anchor-pool state and the records: ``pool_increment`` is ``HINCRBY``, records are ``RPUSH``-ed
JSON lines, both atomic across processes; :meth:`~PoolAndRecordIO.pool_read_many` reads many maps
in one pipelined round trip per server. Every Redis error degrades (``pool_read`` -> ``{}``,
``pool_increment`` -> None, ...) with a warning and a counter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, cast

from kvcomm.errors import StoreError
from kvcomm.store.redis_io import ServerIO


class PoolAndRecordIO(ServerIO):
    """Pool maps and records of a store on Redis servers (mixed into RedisStore, which provides
    ``_full``: a key under the namespace prefix)."""

    _full: Callable[[str], str]

    def pool_read(self, key: str) -> dict[str, str]:
        full = self._full(key)
        empty: dict[bytes, bytes] = {}
        raw = self._on_key(full, f"HGETALL {key!r}", lambda c: cast("dict[bytes, bytes]", c.hgetall(full)), empty)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def pool_read_many(self, keys: Sequence[str]) -> list[dict[str, str]]:
        """``HGETALL`` of every map in one pipelined round trip per server."""
        fulls = [self._full(key) for key in keys]
        out: list[dict[str, str]] = [{} for _ in fulls]
        what = f"HGETALL of {len(fulls)} maps"
        groups = self._route(fulls, what) if fulls else {}
        if not groups:
            return out
        work = {node: ([("HGETALL", fulls[i]) for i in idx], [None] * len(idx)) for node, idx in groups.items()}
        for node, result in self._exchange(cast(Any, work), what).items():
            if isinstance(result, tuple):
                for _ in groups[node]:
                    self._fault(*result)
                continue
            for i, reply in zip(groups[node], result, strict=True):
                if reply.kind == "error":
                    self._fault(*self._reply_fault(node, reply, what))
                elif isinstance(reply.value, list):
                    items = reply.value
                    out[i] = {bytes(items[j]).decode(): bytes(items[j + 1]).decode() for j in range(0, len(items) - 1, 2)}
        return out

    def pool_write(self, key: str, mapping: dict[str, str | int | float]) -> bool:
        full = self._full(key)
        if not mapping:
            return True
        fields: dict[Any, Any] = dict(mapping)  # redis-py's own key/value union
        return self._on_key(full, f"HSET {key!r}", lambda c: c.hset(full, mapping=fields) is not None, False)

    def pool_remove(self, key: str, *fields: str) -> int:
        full = self._full(key)
        if not fields:
            return 0
        return int(self._on_key(full, f"HDEL {key!r}", lambda c: c.hdel(full, *fields), 0))

    def pool_increment(self, key: str, field: str, amount: int = 1) -> int | None:
        full = self._full(key)
        return self._on_key(full, f"HINCRBY {key!r}", lambda c: int(c.hincrby(full, field, amount)), None)

    def append_record(self, key: str, record: dict[str, Any]) -> bool:
        full = self._full(key)
        try:
            line = json.dumps(record)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"record for {key!r} is not JSON-serializable: {exc}") from None
        return self._on_key(full, f"RPUSH {key!r}", lambda c: c.rpush(full, line) > 0, False)

    def read_records(self, key: str) -> list[dict[str, Any]]:
        full = self._full(key)
        out: list[dict[str, Any]] = []
        none: list[bytes] = []
        for line in self._on_key(full, f"LRANGE {key!r}", lambda c: cast("list[bytes]", c.lrange(full, 0, -1)), none):
            try:
                record = json.loads(line)
            except ValueError:
                self._fault("corrupt", f"record list {key!r} holds a line that is not JSON")
                continue
            if isinstance(record, dict):
                out.append(record)
        return out


__all__ = ["PoolAndRecordIO"]
