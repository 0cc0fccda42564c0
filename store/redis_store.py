"""RedisStore: entries, counters and records in a (shared) Redis, on redis-py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvcomm.errors import StoreError
from kvcomm.store.base import KVStore, check_key
from kvcomm.store.codec import CODECS, DEFAULT_MAX_ENTRY_BYTES, EntryFormatError, decode, encode
from kvcomm.store.entry import KVEntry

T = TypeVar("T")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
_SCAN_COUNT = 1000


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and stats)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(KVStore):
    """A store on one Redis server (or anything speaking its protocol), shared across processes.

    Each entry is one Redis string written by one ``SET`` (header and payload in one value), so a
    reader sees the old or the new entry, never half of one. Entries are read with ``GETRANGE``
    capped at ``max_entry_bytes`` + 1, so an oversize value is never transferred whole. Counters
    are ``HINCRBY`` on Redis hashes, records are ``RPUSH``-ed JSON: both atomic across processes.

    Every Redis error degrades (``get`` -> None, ``put`` -> False, ``hincrby`` -> None, ...)
    with one :class:`~kvcomm.errors.StoreFaultWarning` per fault kind and a counter. After a
    connection fault the store skips Redis for ``retry_after`` seconds (a dead server costs
    nothing per call), then reconnects by itself. Construction never connects; :meth:`ping` does.

    Args:
        url: ``redis://[user:pass@]host:port/db`` or ``rediss://`` or ``unix://`` (redis-py URLs).
        namespace: keys live under ``kvcomm:<namespace>:``.
        ttl: default seconds to live of an entry (None or 0: no expiry); counters never expire.
        codec: ``"raw"`` (bit exact) or ``"int8"`` (K per channel, V per token; ~half of bf16).
        device: where decoded tensors are placed (int8 is dequantized there).
        max_entry_bytes: larger entries are neither written nor read (fault ``oversize``).
        socket_timeout, socket_connect_timeout: seconds before a call fails as ``timeout``.
        socket_read_size: bytes per socket read; large values read faster with a large buffer.
        retry_after: seconds to skip Redis after a connection fault or timeout.
        **redis_kwargs: passed to ``redis.Redis.from_url`` (TLS options, username, ...).
    """

    kind = "redis"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        namespace: str = "default",
        ttl: float | None = None,
        codec: str = "raw",
        device: str | torch.device = "cpu",
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        socket_read_size: int = 4 << 20,
        retry_after: float = 1.0,
        **redis_kwargs: Any,
    ) -> None:
        super().__init__(namespace)
        if codec not in CODECS:
            raise StoreError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
        if ttl is not None and ttl < 0:
            raise StoreError(f"ttl must be >= 0 seconds, got {ttl!r}")
        self.url = url
        self.ttl = ttl
        self.codec = codec
        self.device = torch.device(device)
        self.max_entry_bytes = max_entry_bytes
        self.retry_after = retry_after
        self._prefix = f"kvcomm:{namespace}:"
        self._degraded = False
        self._skip_until = 0.0
        redis_kwargs.pop("decode_responses", None)  # values are bytes
        try:
            self.client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_connect_timeout,
                socket_read_size=socket_read_size,
                # one immediate retry re-dials a connection the server dropped (restart);
                # timeouts are not retried, they would only double the wait
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                **redis_kwargs,
            )
        except (ValueError, TypeError) as exc:
            raise StoreError(f"bad Redis URL {redact(url)!r}: {exc}") from None

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _call(self, what: str, fn: Callable[[], T], default: T) -> T:
        """Run one Redis operation; any Redis error becomes a counted, warned fault -> default."""
        if self._degraded and time.monotonic() < self._skip_until:
            self._fault("unreachable", f"{redact(self.url)} failed moments ago; skipping {what}")
            return default
        try:
            result = fn()
        except redis.TimeoutError as exc:
            self._connection_fault("timeout", f"{what} on {redact(self.url)}: {exc}")
        except redis.ConnectionError as exc:
            self._connection_fault("unreachable", f"{what} on {redact(self.url)}: {exc}")
        except redis.RedisError as exc:
            self._fault("server_error", f"{what} on {redact(self.url)}: {type(exc).__name__}: {exc}")
        else:
            if self._degraded:  # recovered: the next outage warns again
                self._degraded = False
                self._rearm("unreachable", "timeout")
            return result
        return default

    def _connection_fault(self, kind: str, message: str) -> None:
        self._degraded = True
        self._skip_until = time.monotonic() + self.retry_after
        self._fault(kind, message)

    # -- entries -------------------------------------------------------------------------------
    def get(self, key: str, *, fingerprint: str | None = None) -> KVEntry | None:
        full = self._full(key)
        # GETRANGE end is inclusive: at most max_entry_bytes + 1 bytes ever cross the wire
        blob = self._call(f"GET {key!r}", lambda: self.client.getrange(full, 0, self.max_entry_bytes), None)
        if not blob:  # missing key (b"") or fault (None)
            self.counters.miss()
            return None
        try:
            entry = decode(
                blob,
                namespace=self.namespace,
                key=key,
                fingerprint=fingerprint,
                max_entry_bytes=self.max_entry_bytes,
                device=self.device,
            )
        except EntryFormatError as exc:
            self._fault(exc.kind, f"entry {key!r}: {exc}")
            self.counters.miss()
            return None
        self.counters.hit(len(blob))
        return entry

    def put(self, key: str, entry: KVEntry, *, ttl: float | None = None) -> bool:
        full = self._full(key)
        if entry.nbytes > 2 * self.max_entry_bytes:  # skip quantizing what cannot fit anyway
            return self._reject(key, entry.nbytes)
        blob = encode(entry, namespace=self.namespace, key=key, codec=self.codec)
        if len(blob) > self.max_entry_bytes:
            return self._reject(key, len(blob))
        ttl = self.ttl if ttl is None else ttl
        px = max(1, int(ttl * 1000)) if ttl else None
        if self._call(f"SET {key!r}", lambda: self.client.set(full, blob, px=px), None):
            self.counters.put(len(blob))
            return True
        self.counters.put_failed()
        return False

    def _reject(self, key: str, nbytes: int) -> bool:
        self._fault("oversize", f"entry {key!r} of {nbytes} bytes is over max_entry_bytes={self.max_entry_bytes}")
        self.counters.put_failed()
        self._call(f"UNLINK {key!r}", lambda: self.client.unlink(self._full(key)), 0)  # drop the stale one
        return False

    def delete(self, key: str) -> bool:
        full = self._full(key)
        return bool(self._call(f"UNLINK {key!r}", lambda: self.client.unlink(full), 0))

    def contains(self, key: str) -> bool:
        full = self._full(key)
        return bool(self._call(f"EXISTS {key!r}", lambda: self.client.exists(full), 0))

    def _scan_full(self, prefix: str) -> list[bytes]:
        pattern = _glob_escape(self._prefix + prefix) + "*"
        return list(self.client.scan_iter(match=pattern, count=_SCAN_COUNT))

    def scan(self, prefix: str = "") -> list[str]:
        keys = self._call("SCAN", lambda: self._scan_full(prefix), [])
        n = len(self._prefix)
        return sorted(k.decode("utf-8", "replace")[n:] for k in keys)

    def clear(self, prefix: str = "") -> int:
        def run() -> int:
            keys, removed = self._scan_full(prefix), 0
            for i in range(0, len(keys), 500):
                removed += self.client.unlink(*keys[i : i + 500])
            return removed

        return self._call("clear", run, 0)

    # -- hashes and records ----------------------------------------------------------------------
    def hincrby(self, key: str, field: str, amount: int = 1) -> int | None:
        full = self._full(key)
        return self._call(f"HINCRBY {key!r}", lambda: int(self.client.hincrby(full, field, amount)), None)

    def hset(self, key: str, mapping: dict[str, str | int | float]) -> bool:
        full = self._full(key)
        if not mapping:
            return True
        return self._call(f"HSET {key!r}", lambda: self.client.hset(full, mapping=mapping) is not None, False)

    def hgetall(self, key: str) -> dict[str, str]:
        full = self._full(key)
        raw = self._call(f"HGETALL {key!r}", lambda: self.client.hgetall(full), {})
        return {k.decode(): v.decode() for k, v in raw.items()}

    def hdel(self, key: str, *fields: str) -> int:
        full = self._full(key)
        if not fields:
            return 0
        return int(self._call(f"HDEL {key!r}", lambda: self.client.hdel(full, *fields), 0))

    def append_record(self, key: str, record: dict[str, Any]) -> bool:
        full = self._full(key)
        try:
            line = json.dumps(record)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"record for {key!r} is not JSON-serializable: {exc}") from None
        return self._call(f"RPUSH {key!r}", lambda: self.client.rpush(full, line) > 0, False)

    def read_records(self, key: str) -> list[dict[str, Any]]:
        full = self._full(key)
        out = []
        for line in self._call(f"LRANGE {key!r}", lambda: self.client.lrange(full, 0, -1), []):
            try:
                record = json.loads(line)
            except ValueError:
                self._fault("corrupt", f"record list {key!r} holds a line that is not JSON")
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    # -- housekeeping ------------------------------------------------------------------------------
    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {redact(self.url)} is not reachable: {type(exc).__name__}: {exc}") from None

    def usage(self) -> dict[str, int]:
        def run() -> dict[str, int]:
            keys = self._scan_full("")
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.type(k)
            types = pipe.execute()
            strings = [k for k, t in zip(keys, types, strict=True) if t == b"string"]
            for k in strings:
                pipe.strlen(k)
            return {"keys": len(keys), "entries": len(strings), "entry_bytes": sum(pipe.execute())}

        return self._call("usage", run, {"keys": 0, "entries": 0, "entry_bytes": 0})

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "url": redact(self.url), "codec": self.codec, "ttl": self.ttl}

    def close(self) -> None:
        self.client.close()
