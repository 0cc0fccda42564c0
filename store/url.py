"""Store URLs, parsed once into typed specs; the one place that reads store URLs from the environment.

``memory://?max_bytes=8GiB&device=cuda`` becomes a :class:`~kvcomm.store.spec.MemorySpec`; ``redis://``,
``rediss://`` (TLS), ``unix://`` and Redis Cluster URLs (``redis+cluster://h1:7000,h2:7000``,
``rediss+cluster://``) become a :class:`~kvcomm.store.spec.RedisSpec`. Stores
are built from specs (:func:`kvcomm.store.from_url`, ``MemoryStore.from_spec``,
``RedisStore.from_spec``) and trust them: a URL is split and its query parsed here only, and the
specs check their values (:mod:`kvcomm.store.spec`).

Which URLs when none is given: :func:`store_urls_from_env` (``$KVCOMM_STORE_URL``, else
``$KVCOMM_REDIS_URL``, else ``redis://127.0.0.1:6379/0``). The entry secret is never a URL
parameter: pass ``secret=`` or set ``$KVCOMM_STORE_KEY`` (:mod:`kvcomm.store.security`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from kvcomm.errors import StoreError
from kvcomm.store.security import ENTRY_KEY_PARAMS, STORE_KEY_ENV, redact, scrub
from kvcomm.store.spec import DEFAULT_MAX_BYTES, MemorySpec, RedisSpec, StoreSpec, host_port

STORE_URL_ENV = "KVCOMM_STORE_URL"
REDIS_URL_ENV = "KVCOMM_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

MEMORY_SCHEME = "memory"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
REDIS_SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)
#: query parameters of memory:// URLs (``prefix``: an alias of ``namespace``)
MEMORY_PARAMS = ("max_bytes", "device", "namespace", "prefix", "ttl")
#: kvcomm's own query parameters of Redis URLs
REDIS_PARAMS = ("namespace", "prefix", "ttl", "codec", "device", "max_entry_bytes", "max_fetch_bytes",
                "fetch_window", "retry_after", "chunk_bytes", "buffer_bytes")
#: query parameters redis-py takes from a URL: its parsed ones plus credentials and TLS files
REDIS_PY_QUERY_PARAMS = (*URL_QUERY_ARGUMENT_PARSERS, "username", "password", "ssl_cert_reqs", "ssl_ca_certs",
                         "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3,
          "ti": 1024**4}
_SPLIT_RE = re.compile(r",\s*(?=[a-z][a-z0-9+.\-]*://)")
_SCHEMES_HINT = "use memory://, redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"


def store_urls_from_env() -> list[str]:
    """The store URLs to use when none is given: the only reader of the store's environment.

    ``$KVCOMM_STORE_URL`` (a full store spec: tiers, ``memory://``), else ``$KVCOMM_REDIS_URL``,
    else ``redis://127.0.0.1:6379/0``. One string may hold several comma-separated URLs.
    """
    return [os.environ.get(STORE_URL_ENV) or os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL]


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``"1073741824"``, ``"512MiB"``, ``"2GB"``, ``"1.5G"`` into bytes (k/M/G are powers of 10).

    Raises:
        StoreError: not a number with an optional unit (the message names ``what``).
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise StoreError(f"bad {what} {text!r}: use bytes or a number with a unit (512MiB, 2GB)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise StoreError(f"bad {what} {text!r}: use a number of seconds") from None
    if value < 0:
        raise StoreError(f"bad {what} {text!r}: must be >= 0")
    return value


# -- parsing ---------------------------------------------------------------------------------------
class _Split(NamedTuple):
    """One URL split once: its parts, kvcomm's query parameters and redis-py's (in order)."""

    url: str
    parts: SplitResult
    ours: dict[str, str]
    theirs: list[tuple[str, str]]


def _split(url: str) -> _Split:
    """Split a URL and its query once; refuse unknown schemes and parameters and URL-borne secrets."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise StoreError(f"unparsable store URL {redact(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    allowed: tuple[str, ...]
    passthrough: tuple[str, ...]
    if scheme == MEMORY_SCHEME:
        allowed, passthrough = MEMORY_PARAMS, ()
    elif scheme in REDIS_SCHEMES:
        allowed, passthrough = REDIS_PARAMS, REDIS_PY_QUERY_PARAMS
    else:
        raise StoreError(f"unknown store URL scheme in {redact(url)!r}: {_SCHEMES_HINT}")
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower() in ENTRY_KEY_PARAMS:
            raise StoreError(f"store URL {redact(url)!r} holds {name!r}: the entry secret does not go in a URL "
                             f"(URLs end up in logs and shell history); set ${STORE_KEY_ENV} or pass secret=")
        if name in allowed:
            ours[name] = value
        elif name in passthrough:
            theirs.append((name, value))
        else:
            accepted = ", ".join((*allowed, *passthrough))
            raise StoreError(f"unknown parameter {name!r} in store URL {redact(url)!r}: accepted: {accepted}")
    if "prefix" in ours:  # DESIGN.md spelling of namespace
        ours.setdefault("namespace", ours["prefix"])
        del ours["prefix"]
    return _Split(url, parts, ours, theirs)


def _cluster_nodes(s: _Split) -> tuple[tuple[str, int], ...]:
    """The ``host:port`` list of a cluster URL (port 6379 where none is given)."""
    hosts = s.parts.netloc.rpartition("@")[2]
    nodes = []
    for item in hosts.split(","):
        try:
            one = urlsplit("//" + item.strip())
            host, port = one.hostname, one.port
        except ValueError:
            raise StoreError(f"bad Redis Cluster URL {redact(s.url)!r}: {item.strip()!r} is not host:port "
                             "(a port is a number in 0-65535)") from None
        if not host:
            raise StoreError(f"bad Redis Cluster URL {redact(s.url)!r}: an empty host in its node list "
                             "(use redis+cluster://host1:7000,host2:7000)")
        nodes.append((host, port or 6379))
    if s.parts.path not in ("", "/", "/0"):
        raise StoreError(f"bad Redis Cluster URL {redact(s.url)!r}: a cluster has only database 0")
    return tuple(nodes)


def _check_redis_location(s: _Split) -> None:
    if s.parts.scheme.lower() in CLUSTER_SCHEMES:
        _cluster_nodes(s)
        return
    if s.parts.scheme.lower() != "unix" and not s.parts.hostname:
        raise StoreError(f"bad Redis URL {redact(s.url)!r}: no host (use redis://host:6379/0)")
    try:
        s.parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise StoreError(f"bad Redis URL {redact(s.url)!r}: the port is not a number in 0-65535") from None


def _memory_spec(s: _Split, namespace: str) -> MemorySpec:
    if s.parts.netloc or s.parts.path not in ("", "/"):
        raise StoreError(f"bad memory store URL {redact(s.url)!r}: use memory://?max_bytes=2GiB&device=cuda")
    q = s.ours
    return MemorySpec(
        namespace=q.get("namespace", namespace),
        device=q.get("device", "cpu"),
        max_bytes=parse_size(q["max_bytes"], "max_bytes") if "max_bytes" in q else DEFAULT_MAX_BYTES,
        ttl=_seconds(q["ttl"], "ttl") if "ttl" in q else None,
    )


def _redis_spec(s: _Split, namespace: str) -> RedisSpec:
    _check_redis_location(s)
    q = s.ours
    options: dict[str, Any] = {"namespace": q.get("namespace", namespace), "codec": q.get("codec", "raw")}
    for name in ("ttl", "retry_after", "fetch_window"):
        if name in q:
            options[name] = _seconds(q[name], name)
    for name in ("max_entry_bytes", "max_fetch_bytes", "chunk_bytes", "buffer_bytes"):
        if name in q:
            options[name] = parse_size(q[name], name)
    if "device" in q:
        options["device"] = q["device"]
    return RedisSpec(url=_connection_url(s), **options, **_cluster_options(s))


def _connection_url(s: _Split) -> str:
    """What redis-py connects with: the URL without kvcomm's parameters; for a cluster, its first node."""
    parts = s.parts._replace(query=urlencode(s.theirs))
    scheme = parts.scheme.lower()
    if scheme in CLUSTER_SCHEMES:
        userinfo = parts.netloc.rpartition("@")[0]
        first = host_port(*_cluster_nodes(s)[0])
        parts = parts._replace(scheme=scheme.removesuffix("+cluster"), path="",
                               netloc=(userinfo + "@" if userinfo else "") + first)
    return urlunsplit(parts)


def _cluster_options(s: _Split) -> dict[str, Any]:
    if s.parts.scheme.lower() not in CLUSTER_SCHEMES:
        return {}
    return {"cluster": True, "nodes": _cluster_nodes(s)}


def _spec(s: _Split, namespace: str) -> StoreSpec:
    if s.parts.scheme.lower() == MEMORY_SCHEME:
        return _memory_spec(s, namespace)
    return _redis_spec(s, namespace)


def _flatten(urls: tuple[str, ...] | list[str]) -> list[str]:
    return [u for url in urls for u in _SPLIT_RE.split(url.strip()) if u]


def parse_store_url(url: str, *, namespace: str = "default") -> StoreSpec:
    """One store URL as its spec.

    - ``memory://``: ``max_bytes`` (512MiB, 2GB, bytes), ``device``, ``namespace``, ``ttl``.
    - ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS), ``unix://``, and a Redis
      Cluster as ``redis+cluster://[user:password@]host:port[,host:port...]`` or
      ``rediss+cluster://``: ``namespace`` (alias ``prefix``), ``ttl``, ``codec`` (raw, int8),
      ``device``, ``max_entry_bytes``, ``max_fetch_bytes``, ``fetch_window``, ``retry_after``,
      ``chunk_bytes`` (entries larger than this are stored in chunks; default 64MiB),
      ``buffer_bytes`` (receive buffers kept for reuse; default 512MiB), plus redis-py's own
      (``socket_timeout``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``,
      ``ssl_check_hostname``, ...), which stay in the connection URL (``RedisSpec.url``).

    Args:
        namespace: the namespace of a URL that names none.

    Raises:
        StoreError: an unknown scheme, an unknown parameter, a secret in the URL, a bad value
            (one line naming the parameter, passwords redacted).
    """
    return _spec(_split(url), namespace)


def parse_store_urls(*urls: str) -> list[StoreSpec]:
    """The specs of one (tiered) store, fastest tier first.

    Each argument is a URL or several separated by commas. The URLs share one namespace: those
    that name none take the one the others name (else ``"default"``).

    Raises:
        StoreError: no URL, URLs naming different namespaces, or any error of
            :func:`parse_store_url`.
    """
    split = [_split(url) for url in _flatten(urls)]
    if not split:
        raise StoreError(f"no store URL given: {_SCHEMES_HINT.removeprefix('use ')}, or several of them")
    named = {s.ours["namespace"] for s in split if "namespace" in s.ours}
    if len(named) > 1:
        raise StoreError(f"the URLs of one tiered store name different namespaces: {sorted(named)}")
    namespace = named.pop() if named else "default"
    return [_spec(s, namespace) for s in split]


def redis_spec(url: str | None = None, *, client_kwargs: Mapping[str, Any] | None = None,
               **options: Any) -> RedisSpec:
    """The spec of ``RedisStore(url, **options, **client_kwargs)``.

    Here the URL is a connection URL only: its query may hold redis-py's parameters but not
    kvcomm's, which are keywords (``namespace=``, ``ttl=``...). With no URL, the one Redis URL of
    :func:`store_urls_from_env`.

    Raises:
        StoreError: not a Redis URL, kvcomm or unknown parameters in it, a bad option value.
    """
    secrets = [str(v) for k, v in (client_kwargs or {}).items() if k in ("password", "ssl_password") and v]
    try:
        s = _split(url) if url is not None else _redis_from_env()
        if s.parts.scheme.lower() not in REDIS_SCHEMES:
            raise StoreError(f"RedisStore needs a Redis URL, got {redact(s.url)!r}: use redis://, rediss://, "
                             "unix:// or redis+cluster://, or kvcomm.store.from_url for other stores")
        if s.ours:
            raise StoreError(f"Redis URL {redact(s.url)!r} has parameters redis-py does not take: "
                             f"{', '.join(sorted(s.ours))} (kvcomm's own, such as namespace or ttl, are "
                             "RedisStore keywords or go through kvcomm.store.from_url)")
        _check_redis_location(s)
    except StoreError as exc:
        raise StoreError(scrub(str(exc), secrets)) from None
    return RedisSpec(url=_connection_url(s) if s.parts.scheme.lower() in CLUSTER_SCHEMES else s.url,
                     client_kwargs=dict(client_kwargs or {}), **options, **_cluster_options(s))


def _redis_from_env() -> _Split:
    urls = [_split(u) for u in _flatten(store_urls_from_env())]
    found = [s for s in urls if s.parts.scheme.lower() in REDIS_SCHEMES]
    if len(found) != 1:
        raise StoreError(f"RedisStore() without a URL needs one Redis URL in ${STORE_URL_ENV} (else "
                         f"${REDIS_URL_ENV}), found {len(found)}: pass the URL or use kvcomm.store.from_url()")
    return found[0]


__all__ = [
    "CLUSTER_SCHEMES",
    "DEFAULT_REDIS_URL",
    "MemorySpec",
    "REDIS_URL_ENV",
    "RedisSpec",
    "STORE_URL_ENV",
    "StoreSpec",
    "parse_size",
    "parse_store_url",
    "parse_store_urls",
    "redis_spec",
    "store_urls_from_env",
]
