"""RedisStore: entries, counters and records in a (shared) Redis, on redis-py.

Security (see also :mod:`kvcomm.store.security` and :mod:`kvcomm.store.codec`): credentials and
TLS come from the URL (``redis://user:pass@host:6379/0``, ``rediss://...?ssl_ca_certs=ca.pem``)
or redis-py keyword arguments; the password is redacted from every message, warning, ``repr`` and
``stats()``. With a secret, entries are signed and only signed entries are accepted. Reads are
bounded per entry (``max_entry_bytes``, enforced by ``GETRANGE`` before the value crosses the
wire) and, optionally, in total (``max_fetch_bytes`` per ``fetch_window`` seconds).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvcomm.errors import EntryFormatError, StoreError
from kvcomm.keys import namespace_prefix
from kvcomm.store.base import KVStore, check_key
from kvcomm.store.codec import DEFAULT_MAX_ENTRY_BYTES, MAGIC, decode, encode, is_signed
from kvcomm.store.entry import KVEntry
from kvcomm.store.security import redact, resolve_secret, scrub
from kvcomm.store.spec import RedisSpec
from kvcomm.store.url import DEFAULT_REDIS_URL, redis_spec

T = TypeVar("T")

DEFAULT_URL = DEFAULT_REDIS_URL
_SCAN_COUNT = 1000
_AUTH_ERRORS = (redis.AuthenticationError, redis.exceptions.AuthorizationError)

__all__ = ["DEFAULT_URL", "RedisStore", "redact"]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(KVStore):
    """A store on one Redis server (or anything speaking its protocol), shared across processes.

    Each entry is one Redis string written by one ``SET`` (header and payload in one value), so a
    reader sees the old or the new entry, never half of one. Entries are read with ``GETRANGE``
    capped at ``max_entry_bytes`` + 1, so an oversize value is never transferred whole. The
    anchor-pool maps are Redis hashes (``pool_increment`` is ``HINCRBY``), records are
    ``RPUSH``-ed JSON: both atomic across processes.

    Every Redis error degrades (``get`` -> None, ``put`` -> False, ``pool_increment`` -> None, ...)
    with one :class:`~kvcomm.errors.StoreFaultWarning` per fault kind and a counter; refused
    credentials and ACL denials count as ``auth``. After a connection or auth fault the store
    skips Redis for ``retry_after`` seconds (a dead server costs nothing per call), then
    reconnects by itself. Construction does not connect unless ``check=True``; :meth:`ping` does.

    ``RedisStore(url, **options)`` and ``RedisStore.from_spec(spec)`` build the same store: the
    first parses ``url`` into a :class:`~kvcomm.store.spec.RedisSpec`
    (:func:`~kvcomm.store.url.redis_spec`), the second takes one already parsed
    (:func:`kvcomm.store.from_url` does so).

    Args:
        url: a connection URL: ``redis://[user:pass@]host:port/db``, ``rediss://...`` (TLS;
            redis-py's ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` ...
            as query parameters or keywords) or ``unix://``; kvcomm's options are the keywords
            below. None: the Redis URL of :func:`~kvcomm.store.url.store_urls_from_env`.
        namespace: keys live under ``kvcomm:<namespace>:``; the namespace is also in every MAC.
        ttl: default seconds to live of an entry (None or 0: no expiry); counters never expire.
        codec: ``"raw"`` (bit exact) or ``"int8"`` (K per channel, V per token; ~half of bf16).
        device: where decoded tensors are placed (int8 is dequantized there).
        max_entry_bytes: larger entries are neither written nor read (fault ``oversize``).
        max_fetch_bytes: if set, at most this many entry bytes are read per ``fetch_window``
            seconds (a fixed window per store object, shared by its threads); a get that would
            go over is a miss (fault ``budget``) and reads at most the budget left.
        fetch_window: seconds after which the fetch budget resets.
        secret: HMAC-SHA256 key (str or bytes, >= 16 bytes) that signs every entry written and
            must have signed every entry read; None: ``$KVCOMM_STORE_KEY``; ``""``: unsigned.
        check: ping at construction and raise :class:`~kvcomm.errors.StoreError` (one line,
            password redacted) if the server is unreachable or refuses the credentials.
        socket_timeout, socket_connect_timeout: seconds before a call fails as ``timeout``.
        socket_read_size: bytes per socket read; large values read faster with a large buffer.
        retry_after: seconds to skip Redis after a connection fault or timeout.
        **redis_kwargs: passed to ``redis.Redis.from_url`` (``username``, ``password``, TLS
            options, ...).
    """

    kind = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str = "default",
        ttl: float | None = None,
        codec: str = "raw",
        device: str | torch.device = "cpu",
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_fetch_bytes: int | None = None,
        fetch_window: float = 1.0,
        secret: str | bytes | None = None,
        check: bool = False,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        socket_read_size: int = 4 << 20,
        retry_after: float = 1.0,
        **redis_kwargs: Any,
    ) -> None:
        spec = redis_spec(
            url,
            namespace=namespace,
            ttl=ttl,
            codec=codec,
            device=str(device),
            max_entry_bytes=max_entry_bytes,
            max_fetch_bytes=max_fetch_bytes,
            fetch_window=fetch_window,
            retry_after=retry_after,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            socket_read_size=socket_read_size,
            client_kwargs=redis_kwargs,
        )
        self._open(spec, secret=secret, check=check)

    @classmethod
    def from_spec(cls, spec: RedisSpec, *, secret: str | bytes | None = None, check: bool = False) -> RedisStore:
        """The store a parsed spec describes (:func:`kvcomm.store.url.parse_store_url`); see the class."""
        store = cls.__new__(cls)
        store._open(spec, secret=secret, check=check)
        return store

    def _open(self, spec: RedisSpec, *, secret: str | bytes | None, check: bool) -> None:
        """Set up from a spec, trusted as is: every field was checked when it was built."""
        KVStore.__init__(self, spec.namespace)
        self.spec = spec
        self._secrets = list(spec.secrets)
        self._secret = resolve_secret(secret)
        self.url = spec.display_url  # the password stays in the connection pool only
        self.ttl = spec.ttl
        self.codec = spec.codec
        self.device = torch.device(spec.device)
        self.max_entry_bytes = spec.max_entry_bytes
        self.max_fetch_bytes = spec.max_fetch_bytes
        self.fetch_window = spec.fetch_window
        self.retry_after = spec.retry_after
        self._prefix = namespace_prefix(spec.namespace)
        self._degraded = False
        self._skip_until = 0.0
        self._budget_lock = threading.Lock()
        self._window_start = time.monotonic()
        self._fetched = 0
        client_kwargs = {k: v for k, v in spec.client_kwargs.items() if k != "decode_responses"}  # values are bytes
        try:
            self.client = redis.Redis.from_url(
                spec.url,
                socket_timeout=spec.socket_timeout,
                socket_connect_timeout=spec.socket_connect_timeout,
                socket_read_size=spec.socket_read_size,
                # one immediate retry re-dials a connection the server dropped (restart);
                # timeouts are not retried, they would only double the wait
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                **client_kwargs,
            )
        except (ValueError, TypeError) as exc:
            raise StoreError(self._scrub(f"bad Redis URL {self.url!r}: {exc}")) from None
        if check:
            try:
                self.ping()
            except BaseException:
                self.client.close()
                raise

    @property
    def signed(self) -> bool:
        """Whether this store signs what it writes and accepts only signed entries."""
        return self._secret is not None

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, namespace={self.namespace!r}, codec={self.codec!r}, signed={self.signed})"

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _call(self, what: str, fn: Callable[[], T], default: T) -> T:
        """Run one Redis operation; any Redis error becomes a counted, warned fault -> default."""
        if self._degraded and time.monotonic() < self._skip_until:
            self._fault("unreachable", f"{self.url} failed moments ago; skipping {what}")
            return default
        try:
            result = fn()
        except _AUTH_ERRORS as exc:
            self._connection_fault("auth", f"{what} on {self.url}: credentials refused: {type(exc).__name__}: {exc}")
        except redis.exceptions.NoPermissionError as exc:
            self._fault("auth", f"{what} on {self.url}: the ACL forbids it: {exc}")
        except redis.TimeoutError as exc:
            self._connection_fault("timeout", f"{what} on {self.url}: {exc}")
        except redis.ConnectionError as exc:
            self._connection_fault("unreachable", f"{what} on {self.url}: {exc}")
        except redis.RedisError as exc:
            self._fault("server_error", f"{what} on {self.url}: {type(exc).__name__}: {exc}")
        else:
            if self._degraded:  # recovered: the next outage warns again
                self._degraded = False
                self._rearm("unreachable", "timeout", "auth")
            return result
        return default

    def _connection_fault(self, kind: str, message: str) -> None:
        self._degraded = True
        self._skip_until = time.monotonic() + self.retry_after
        self._fault(kind, message)

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

    # -- entries -------------------------------------------------------------------------------
    def get(self, key: str, *, fingerprint: str | None = None) -> KVEntry | None:
        full = self._full(key)
        cap = self._budget_left()
        if cap <= 0:
            self._fault("budget", f"GET {key!r}: the fetch budget of {self.max_fetch_bytes} bytes per "
                                  f"{self.fetch_window:g} s is spent")
            self.counters.miss()
            return None
        # GETRANGE end is inclusive: at most cap + 1 bytes ever cross the wire
        blob = self._call(f"GET {key!r}", lambda: cast("bytes | None", self.client.getrange(full, 0, cap)), None)
        if blob:
            self._charge(len(blob))
        if not blob:  # missing key (b"") or fault (None)
            self.counters.miss()
            return None
        if len(blob) > cap and cap < self.max_entry_bytes:
            self._fault("budget", f"GET {key!r}: the value is larger than the {cap} bytes left of the fetch "
                                  f"budget ({self.max_fetch_bytes} bytes per {self.fetch_window:g} s)")
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
                secret=self._secret,
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
        blob = encode(entry, namespace=self.namespace, key=key, codec=self.codec, secret=self._secret)
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
        none: list[bytes] = []
        keys = self._call("SCAN", lambda: self._scan_full(prefix), none)
        n = len(self._prefix)
        return sorted(k.decode("utf-8", "replace")[n:] for k in keys)

    def clear(self, prefix: str = "") -> int:
        def run() -> int:
            keys, removed = self._scan_full(prefix), 0
            for i in range(0, len(keys), 500):
                removed += self.client.unlink(*keys[i : i + 500])
            return removed

        return self._call("clear", run, 0)

    # -- anchor-pool state (Redis hashes) and records (Redis lists) ---------------------------------
    def pool_read(self, key: str) -> dict[str, str]:
        full = self._full(key)
        empty: dict[bytes, bytes] = {}
        raw = self._call(f"HGETALL {key!r}", lambda: cast("dict[bytes, bytes]", self.client.hgetall(full)), empty)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def pool_write(self, key: str, mapping: dict[str, str | int | float]) -> bool:
        full = self._full(key)
        if not mapping:
            return True
        fields: dict[Any, Any] = dict(mapping)  # redis-py's own key/value union
        return self._call(f"HSET {key!r}", lambda: self.client.hset(full, mapping=fields) is not None, False)

    def pool_remove(self, key: str, *fields: str) -> int:
        full = self._full(key)
        if not fields:
            return 0
        return int(self._call(f"HDEL {key!r}", lambda: self.client.hdel(full, *fields), 0))

    def pool_increment(self, key: str, field: str, amount: int = 1) -> int | None:
        full = self._full(key)
        return self._call(f"HINCRBY {key!r}", lambda: int(self.client.hincrby(full, field, amount)), None)

    def append_record(self, key: str, record: dict[str, Any]) -> bool:
        full = self._full(key)
        try:
            line = json.dumps(record)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"record for {key!r} is not JSON-serializable: {exc}") from None
        return self._call(f"RPUSH {key!r}", lambda: self.client.rpush(full, line) > 0, False)

    def read_records(self, key: str) -> list[dict[str, Any]]:
        full = self._full(key)
        out: list[dict[str, Any]] = []
        none: list[bytes] = []
        for line in self._call(f"LRANGE {key!r}", lambda: cast("list[bytes]", self.client.lrange(full, 0, -1)), none):
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
        except _AUTH_ERRORS as exc:
            who = self.client.connection_pool.connection_kwargs.get("username") or "default"
            raise StoreError(self._scrub(
                f"Redis at {self.url} refused the credentials of user {who!r} (wrong or missing password, "
                f"or a disabled user): {type(exc).__name__}: {exc}"
            )) from None
        except redis.RedisError as exc:
            raise StoreError(self._scrub(f"Redis at {self.url} is not reachable: {type(exc).__name__}: {exc}")) from None

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
                pipe.getrange(k, 0, 7)  # magic, version, flags: nothing else is read
            out = pipe.execute()
            heads = out[1::2]
            return {
                "keys": len(keys),
                "entries": len(strings),
                "entry_bytes": sum(out[0::2]),
                "signed_entries": sum(map(is_signed, heads)),
                "unsigned_entries": sum(h[:4] == MAGIC and not is_signed(h) for h in heads),
            }

        empty = {"keys": 0, "entries": 0, "entry_bytes": 0, "signed_entries": 0, "unsigned_entries": 0}
        return self._call("usage", run, empty)

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "url": self.url,
            "codec": self.codec,
            "ttl": self.ttl,
            "signed": self.signed,
            "integrity": "hmac-sha256 (signed)" if self.signed else "sha256 checksum only (unsigned)",
            "max_entry_bytes": self.max_entry_bytes,
            "max_fetch_bytes": self.max_fetch_bytes,
        }

    def close(self) -> None:
        self.client.close()
