"""RedisStore: entries, counters and records in a (shared) Redis server or Redis Cluster, on redis-py.

Security (see also :mod:`kvcomm.store.security` and :mod:`kvcomm.store.codec`): credentials and
TLS come from the URL (``redis://user:pass@host:6379/0``, ``rediss://...?ssl_ca_certs=ca.pem``,
``redis+cluster://user:pass@h1:7000,h2:7000``) or redis-py keyword arguments; the password is
redacted from every message, warning, ``repr`` and ``stats()``. With a secret, entries are signed
and only signed entries are accepted. Reads are bounded per entry (``max_entry_bytes``, enforced by
``GETRANGE`` before the value crosses the wire) and, optionally, in total (``max_fetch_bytes`` per
``fetch_window`` seconds).

Speed (:mod:`kvcomm.store.wire`, :mod:`kvcomm.store.buffers`): reads of entries go out as one
pipelined batch per server (every shard of a cluster at once), and each reply is received
straight into a reused buffer that the decoded tensors then view, without further copies.

The class is assembled from parts, one concept each: :mod:`kvcomm.store.redis_entries` (entry
reads and writes, the fetch budget), :mod:`kvcomm.store.redis_pools` (anchor-pool maps and
records) and :mod:`kvcomm.store.redis_io` (routing, batches, faults); this module holds the
construction from a URL or spec, the namespace's keys (``contains``, ``scan``, ``clear``) and
the housekeeping (``ping``, ``usage``, ``stats``, ``close``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvcomm.errors import StoreError
from kvcomm.keys import is_chunk_key, namespace_prefix, parse_key
from kvcomm.store.base import KVStore, check_key
from kvcomm.store.buffers import BufferPool
from kvcomm.store.codec import DEFAULT_MAX_ENTRY_BYTES
from kvcomm.store.nodes import Cluster, SingleServer, TopologyError
from kvcomm.store.redis_entries import EntryIO
from kvcomm.store.redis_io import AUTH_ERRORS, glob_escape, node_usage, url_user
from kvcomm.store.redis_pools import PoolAndRecordIO
from kvcomm.store.security import redact, resolve_secret, scrub
from kvcomm.store.spec import RedisSpec
from kvcomm.store.url import DEFAULT_REDIS_URL, redis_spec

DEFAULT_URL = DEFAULT_REDIS_URL

__all__ = ["DEFAULT_URL", "RedisStore", "redact"]


class RedisStore(EntryIO, PoolAndRecordIO, KVStore):
    """A store on one Redis server or a Redis Cluster, shared across processes and hosts.

    Each entry is one Redis string written by one ``SET`` (header and payload in one value), so a
    reader sees the old or the new entry, never half of one. An entry larger than ``chunk_bytes``
    is written as chunk keys and then a manifest under its key (:mod:`kvcomm.store.chunks`); on a
    cluster the chunks spread over the shards. Entries are read with ``GETRANGE`` capped at
    ``max_entry_bytes`` + 1, so an oversize value is never transferred whole; :meth:`get_many`
    reads many in one pipelined round trip per server. The anchor-pool maps are Redis hashes
    (``pool_increment`` is ``HINCRBY``), records are ``RPUSH``-ed JSON: both atomic across processes.

    Every Redis error degrades (``get`` -> None, ``put`` -> False, ``pool_increment`` -> None, ...)
    with one :class:`~kvcomm.errors.StoreFaultWarning` per fault kind and a counter; refused
    credentials and ACL denials count as ``auth``. After a connection or auth fault the server
    (on a cluster: that shard only) is skipped for ``retry_after`` seconds, so a dead server costs
    nothing per call while the other shards keep serving; then it is tried again. Construction
    does not connect unless ``check=True``; :meth:`ping` does.

    ``RedisStore(url, **options)`` and ``RedisStore.from_spec(spec)`` build the same store: the
    first parses ``url`` into a :class:`~kvcomm.store.spec.RedisSpec`
    (:func:`~kvcomm.store.url.redis_spec`), the second takes one already parsed
    (:func:`kvcomm.store.from_url` does so).

    Args:
        url: a connection URL: ``redis://[user:pass@]host:port/db``, ``rediss://...`` (TLS;
            redis-py's ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` ...
            as query parameters or keywords), ``unix://``, or a Redis Cluster:
            ``redis+cluster://[user:pass@]host:port[,host:port...]`` (``rediss+cluster://`` with
            TLS); kvcomm's options are the keywords below. None: the Redis URL of
            :func:`~kvcomm.store.url.store_urls_from_env`.
        namespace: keys live under ``kvcomm:<namespace>:``; the namespace is also in every MAC.
        ttl: default seconds to live of an entry (None or 0: no expiry); counters never expire.
        codec: ``"raw"`` (bit exact) or ``"int8"`` (K per channel, V per token; ~half of bf16).
        device: where decoded tensors are placed (int8 is dequantized there; for a CUDA device
            replies are received into pinned memory and copied asynchronously).
        max_entry_bytes: larger entries are neither written nor read (fault ``oversize``).
        max_fetch_bytes: if set, at most this many entry bytes are read per ``fetch_window``
            seconds (a fixed window per store object, shared by its threads); a get that would
            go over is a miss (fault ``budget``) and reads at most the budget left.
        fetch_window: seconds after which the fetch budget resets.
        chunk_bytes: encoded entries larger than this are stored in chunks of this size.
        buffer_bytes: bytes of receive buffers kept for reuse (0: a new buffer per read).
        secret: HMAC-SHA256 key (str or bytes, >= 16 bytes) that signs every entry written and
            must have signed every entry read; None: ``$KVCOMM_STORE_KEY``; ``""``: unsigned.
        check: ping at construction and raise :class:`~kvcomm.errors.StoreError` (one line,
            password redacted) if the server is unreachable or refuses the credentials.
        socket_timeout, socket_connect_timeout: seconds before a call fails as ``timeout``.
        socket_read_size: bytes per socket read of redis-py's own parser (small replies).
        retry_after: seconds to skip a server after a connection fault or timeout.
        **redis_kwargs: passed to ``redis.Redis.from_url`` / ``RedisCluster`` (``username``,
            ``password``, TLS options, ...).
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
        chunk_bytes: int | None = None,
        buffer_bytes: int | None = None,
        secret: str | bytes | None = None,
        check: bool = False,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        socket_read_size: int = 4 << 20,
        retry_after: float = 1.0,
        **redis_kwargs: Any,
    ) -> None:
        sizes = {k: v for k, v in (("chunk_bytes", chunk_bytes), ("buffer_bytes", buffer_bytes)) if v is not None}
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
            **sizes,
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
        self.kind = "redis-cluster" if spec.cluster else "redis"
        self._secrets = list(spec.secrets)
        self._secret = resolve_secret(secret)
        self.url = spec.display_url  # the password stays in the connection pool only
        self.ttl = spec.ttl
        self.codec = spec.codec
        self.device = torch.device(spec.device)
        self.max_entry_bytes = spec.max_entry_bytes
        self.max_fetch_bytes = spec.max_fetch_bytes
        self.fetch_window = spec.fetch_window
        self.chunk_bytes = spec.chunk_bytes
        self.retry_after = spec.retry_after
        self._prefix = namespace_prefix(spec.namespace)
        self._buffers = BufferPool(spec.buffer_bytes, pin=self.device.type == "cuda")
        self._budget_lock = threading.Lock()
        self._window_start = time.monotonic()
        self._fetched = 0
        self._topology_skip_until = 0.0
        client_kwargs: dict[str, Any] = {k: v for k, v in spec.client_kwargs.items() if k != "decode_responses"}
        # RESP2 unless asked otherwise: no push messages between replies (redis-py 8 defaults to RESP3)
        client_kwargs.setdefault("protocol", 2)
        timeouts = {"socket_timeout": spec.socket_timeout, "socket_connect_timeout": spec.socket_connect_timeout,
                    "socket_read_size": spec.socket_read_size}
        try:
            if spec.cluster:
                self.topology = Cluster(spec, {**timeouts, **client_kwargs})
            else:
                client = redis.Redis.from_url(
                    spec.url, **timeouts,
                    # one immediate retry re-dials a connection the server dropped (restart);
                    # timeouts are not retried, they would only double the wait
                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                    **client_kwargs,
                )
                self.topology = SingleServer(self.url, client)
        except (ValueError, TypeError) as exc:
            raise StoreError(self._scrub(f"bad Redis URL {self.url!r}: {exc}")) from None
        if check:
            try:
                self.ping()
            except BaseException:
                self.topology.close()
                raise

    @property
    def client(self) -> Any:
        """The redis-py client: ``redis.Redis`` for one server, ``RedisCluster`` for a cluster."""
        return self.topology.client if isinstance(self.topology, Cluster) else self.topology.primaries()[0].client

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

    def contains(self, key: str) -> bool:
        full = self._full(key)
        return bool(self._on_key(full, f"EXISTS {key!r}", lambda c: c.exists(full), 0))

    def scan(self, prefix: str = "") -> list[str]:
        pattern = glob_escape(self._prefix + prefix) + "*"
        n = len(self._prefix)
        keys = [k.decode("utf-8", "replace")[n:] for node in self._primaries("SCAN")
                for k in self._scan_node(node, pattern)]
        return sorted(k for k in keys if not is_chunk_key(k))

    def clear(self, prefix: str = "") -> int:
        pattern = glob_escape(self._prefix + prefix) + "*"
        n = len(self._prefix)
        removed = 0
        for node in self._primaries("clear"):
            keys = self._scan_node(node, pattern)
            names = [k.decode("utf-8", "replace") for k in keys]
            gone = self._unlink_on(node, names, "clear")
            removed += sum(1 for name, ok in zip(names, gone, strict=True) if ok and not is_chunk_key(name[n:]))
        if prefix:  # the chunks of the entries just removed (their keys start with the chunk prefix)
            orphans = []
            for node in self._primaries("clear"):
                for k in self._scan_node(node, glob_escape(self._prefix + "~chunk:") + "*"):
                    rel = k.decode("utf-8", "replace")[n:]
                    try:
                        entry = getattr(parse_key(rel), "entry", "")
                    except StoreError:
                        continue
                    if entry.startswith(prefix):
                        orphans.append(self._prefix + rel)
            self._unlink(orphans, "clear")
        return removed

    # -- housekeeping ------------------------------------------------------------------------------
    def ping(self) -> None:
        try:
            nodes = self.topology.primaries()
            for node in nodes:
                node.client.ping()
        except AUTH_ERRORS as exc:
            who = self.spec.client_kwargs.get("username") or url_user(self.spec.url) or "default"
            raise StoreError(self._scrub(
                f"Redis at {self.url} refused the credentials of user {who!r} (wrong or missing password, "
                f"or a disabled user): {type(exc).__name__}: {exc}"
            )) from None
        except (redis.RedisError, TopologyError) as exc:
            raise StoreError(self._scrub(f"Redis at {self.url} is not reachable: {type(exc).__name__}: {exc}")) from None

    def usage(self) -> dict[str, Any]:
        """What this namespace holds, in total and per server (``shards``): keys, entries, their
        bytes, signed and unsigned entries, and each server's memory use and eviction policy."""
        totals: dict[str, Any] = dict.fromkeys(("keys", "entries", "entry_bytes", "signed_entries",
                                               "unsigned_entries", "chunks"), 0)
        shards = []
        for node in self._primaries("usage"):
            row = self._run(node, "usage", lambda c: node_usage(c, self._prefix), None)
            if row is None:
                shards.append({"node": node.name, "error": "unreachable"})
                continue
            shards.append({"node": node.name, **row})
            for name in totals:
                totals[name] += row[name]
        return {**totals, "shards": shards}

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "url": self.url,
            "codec": self.codec,
            "ttl": self.ttl,
            "signed": self.signed,
            "integrity": "hmac-sha256 (signed)" if self.signed else "checksum only (unsigned)",
            "max_entry_bytes": self.max_entry_bytes,
            "max_fetch_bytes": self.max_fetch_bytes,
            "chunk_bytes": self.chunk_bytes,
            "buffers": self._buffers.stats(),
        }

    def close(self) -> None:
        self.topology.close()
        self._buffers.clear()
