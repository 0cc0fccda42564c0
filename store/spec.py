"""The typed specs of store tiers: every option of one store, checked once, trusted by the stores.

:func:`kvcomm.store.url.parse_store_url` makes them from URLs; ``MemoryStore.from_spec`` and
``RedisStore.from_spec`` build stores from them without checking again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kvcomm.errors import StoreError
from kvcomm.store.base import check_namespace
from kvcomm.store.buffers import DEFAULT_POOL_BYTES
from kvcomm.store.chunks import MIN_CHUNK_BYTES
from kvcomm.store.codec import CODECS, DEFAULT_MAX_ENTRY_BYTES
from kvcomm.store.security import redact, url_secrets

#: default byte budget of a memory tier
DEFAULT_MAX_BYTES = 2 << 30
#: entries (encoded) larger than this are written as several chunk keys plus a manifest; well
#: under Redis' proto-max-bulk-len (512 MB), and small enough to spread a large entry over shards
DEFAULT_CHUNK_BYTES = 64 << 20


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and ttl < 0:
        raise StoreError(f"ttl must be >= 0 seconds, got {ttl!r}")


@dataclass(frozen=True)
class MemorySpec:
    """An in-process tier (:class:`~kvcomm.store.MemoryStore`): ``memory://?max_bytes=2GiB&device=cuda``.

    Attributes:
        namespace: key namespace (``kvcomm:<namespace>:``, :func:`kvcomm.keys.namespace_prefix`).
        device: where the entries' tensors live (``cpu``, ``cuda``, ``cuda:1``...).
        max_bytes: byte budget of the entries' tensors (LRU beyond it).
        ttl: default seconds to live of an entry (None or 0: no expiry).
    """

    namespace: str = "default"
    device: str = "cpu"
    max_bytes: int = DEFAULT_MAX_BYTES
    ttl: float | None = None

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise StoreError(f"memory store max_bytes must be a non-negative int, got {self.max_bytes!r}")
        _check_ttl(self.ttl)


@dataclass(frozen=True)
class RedisSpec:
    """A Redis tier (:class:`~kvcomm.store.RedisStore`): the connection and kvcomm's options.

    Attributes:
        url: what redis-py connects with: ``redis[s]://[user:pass@]host:port/db`` or ``unix://``,
            its query holding only redis-py's own parameters (``socket_timeout``, TLS files...).
            For a cluster, the URL of its first startup node (credentials and TLS for all).
            Never shown (it may hold a password): see ``display_url``.
        cluster: a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``), served by redis-py's
            ``RedisCluster``; ``nodes`` are its startup nodes (any reachable one finds the rest).
        nodes: ``(host, port)`` of every startup node of a cluster (empty for one server).
        chunk_bytes: an encoded entry larger than this is stored as chunks of this size on keys of
            their own (spread over a cluster's shards) plus a manifest under the entry's key.
        buffer_bytes: bytes of receive buffers kept for reuse (:class:`kvcomm.store.buffers.BufferPool`).
        namespace: keys live under ``kvcomm:<namespace>:``; the namespace is also in every MAC.
        ttl: default seconds to live of an entry (None or 0: no expiry).
        codec: ``"raw"`` (bit exact) or ``"int8"``.
        device: where decoded tensors are placed.
        max_entry_bytes: larger entries are neither written nor read.
        max_fetch_bytes: at most this many entry bytes read per ``fetch_window`` seconds (None: no cap).
        fetch_window: seconds after which the fetch budget resets.
        retry_after: seconds to skip Redis after a connection fault or timeout.
        socket_timeout, socket_connect_timeout, socket_read_size: redis-py's, unless the URL's
            query sets them (redis-py lets the URL win).
        client_kwargs: further keyword arguments of ``redis.Redis.from_url`` (``password``, TLS...).
        display_url: ``url`` with its password and secret-like values redacted (derived).
        secrets: every secret string of ``url`` and ``client_kwargs``, scrubbed from messages (derived).
    """

    url: str = field(repr=False)
    namespace: str = "default"
    ttl: float | None = None
    codec: str = "raw"
    device: str = "cpu"
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    max_fetch_bytes: int | None = None
    fetch_window: float = 1.0
    retry_after: float = 1.0
    socket_timeout: float = 5.0
    socket_connect_timeout: float = 2.0
    socket_read_size: int = 4 << 20
    cluster: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    buffer_bytes: int = DEFAULT_POOL_BYTES
    client_kwargs: Mapping[str, Any] = field(default_factory=dict, repr=False, hash=False)
    display_url: str = field(init=False)
    secrets: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        _check_ttl(self.ttl)
        if self.codec not in CODECS:
            raise StoreError(f"unknown codec {self.codec!r}: use one of {', '.join(CODECS)}")
        if not isinstance(self.max_entry_bytes, int) or self.max_entry_bytes <= 0:
            raise StoreError(f"max_entry_bytes must be a positive int, got {self.max_entry_bytes!r}")
        if self.max_fetch_bytes is not None and (not isinstance(self.max_fetch_bytes, int) or self.max_fetch_bytes <= 0):
            raise StoreError(f"max_fetch_bytes must be a positive int or None, got {self.max_fetch_bytes!r}")
        if not self.fetch_window > 0:
            raise StoreError(f"fetch_window must be > 0 seconds, got {self.fetch_window!r}")
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes < MIN_CHUNK_BYTES:
            raise StoreError(f"chunk_bytes must be an int >= {MIN_CHUNK_BYTES}, got {self.chunk_bytes!r}")
        if not isinstance(self.buffer_bytes, int) or self.buffer_bytes < 0:
            raise StoreError(f"buffer_bytes must be a non-negative int, got {self.buffer_bytes!r}")
        if self.cluster and not self.nodes:
            raise StoreError("a Redis Cluster spec needs at least one startup node")
        kwargs = dict(self.client_kwargs)
        secrets = url_secrets(self.url) + [str(kwargs[k]) for k in ("password", "ssl_password") if kwargs.get(k)]
        object.__setattr__(self, "client_kwargs", MappingProxyType(kwargs))
        object.__setattr__(self, "display_url", _cluster_display(self.url, self.nodes) if self.cluster else redact(self.url))
        object.__setattr__(self, "secrets", tuple(secrets))


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cluster_display(url: str, nodes: tuple[tuple[str, int], ...]) -> str:
    """``redis+cluster://user:***@h1:p1,h2:p2/?query`` from a node URL and the startup nodes."""
    parts = urlsplit(redact(url))
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + ",".join(host_port(h, p) for h, p in nodes)
    return urlunsplit((parts.scheme + "+cluster", netloc, parts.path, parts.query, ""))


StoreSpec = MemorySpec | RedisSpec

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_MAX_BYTES", "MemorySpec", "RedisSpec", "StoreSpec"]
