"""from_url(): build a store (or a TieredStore) from URLs such as ``memory://`` and ``redis://``.

Which URL: the arguments, else ``$KVCOMM_STORE_URL``, else ``$KVCOMM_REDIS_URL``, else
``redis://127.0.0.1:6379/0`` (``kvcomm store ...`` follows the same order, ``--url`` first). The
entry secret is never a URL parameter: pass ``secret=`` or set ``$KVCOMM_STORE_KEY``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvcomm.errors import StoreError
from kvcomm.store.base import KVStore
from kvcomm.store.memory import MemoryStore
from kvcomm.store.redis_store import REDIS_PY_QUERY_PARAMS, RedisStore
from kvcomm.store.security import ENTRY_KEY_PARAMS, STORE_KEY_ENV, redact, store_urls
from kvcomm.store.tiered import TieredStore

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_MEMORY_PARAMS = ("max_bytes", "device", "namespace", "prefix", "ttl")
_REDIS_PARAMS = ("namespace", "prefix", "ttl", "codec", "device", "max_entry_bytes", "max_fetch_bytes", "fetch_window",
                 "retry_after")

_REDIS_SCHEMES = ("redis", "rediss", "unix")
_SPLIT_RE = re.compile(r",\s*(?=[a-z][a-z0-9+.\-]*://)")


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``"1073741824"``, ``"512MiB"``, ``"2GB"``, ``"1.5G"`` into bytes (k/M/G are powers of 10)."""
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


def _query(url: str, allowed: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name.lower() in ENTRY_KEY_PARAMS:
            raise StoreError(f"store URL {redact(url)!r} holds {name!r}: the entry secret does not go in a URL "
                             f"(URLs end up in logs and shell history); set ${STORE_KEY_ENV} or pass secret=")
        if name not in allowed:
            raise StoreError(f"unknown parameter {name!r} in store URL {redact(url)!r}: accepted: {', '.join(allowed)}")
        params[name] = value
    if "prefix" in params:  # DESIGN.md spelling
        params.setdefault("namespace", params.pop("prefix"))
        params.pop("prefix", None)
    return params


def _namespace(url: str) -> str | None:
    q = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    return q.get("namespace", q.get("prefix"))


def _memory(url: str, namespace: str) -> MemoryStore:
    parts = urlsplit(url)
    if parts.netloc or parts.path not in ("", "/"):
        raise StoreError(f"bad memory store URL {redact(url)!r}: use memory://?max_bytes=2GiB&device=cuda")
    q = _query(url, _MEMORY_PARAMS)
    kwargs: dict[str, Any] = {"namespace": q.get("namespace", namespace), "device": q.get("device", "cpu")}
    if "max_bytes" in q:
        kwargs["max_bytes"] = parse_size(q["max_bytes"], "max_bytes")
    if "ttl" in q:
        kwargs["ttl"] = _seconds(q["ttl"], "ttl")
    return MemoryStore(**kwargs)


def _redis(url: str, namespace: str, secret: str | bytes | None) -> RedisStore:
    parts = urlsplit(url)
    q = _query(url, _REDIS_PARAMS + REDIS_PY_QUERY_PARAMS)
    ours = {k: v for k, v in q.items() if k in _REDIS_PARAMS}
    theirs = [(k, v) for k, v in q.items() if k not in _REDIS_PARAMS]
    if parts.scheme != "unix" and not parts.hostname:
        raise StoreError(f"bad Redis URL {redact(url)!r}: no host (use redis://host:6379/0)")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise StoreError(f"bad Redis URL {redact(url)!r}: the port is not a number in 0-65535") from None
    kwargs: dict[str, Any] = {"namespace": ours.get("namespace", namespace), "codec": ours.get("codec", "raw")}
    if "ttl" in ours:
        kwargs["ttl"] = _seconds(ours["ttl"], "ttl")
    if "retry_after" in ours:
        kwargs["retry_after"] = _seconds(ours["retry_after"], "retry_after")
    for name in ("max_entry_bytes", "max_fetch_bytes"):
        if name in ours:
            kwargs[name] = parse_size(ours[name], name)
    if "fetch_window" in ours:
        kwargs["fetch_window"] = _seconds(ours["fetch_window"], "fetch_window")
    if "device" in ours:
        kwargs["device"] = ours["device"]
    return RedisStore(urlunsplit(parts._replace(query=urlencode(theirs))), secret=secret, **kwargs)


def from_url(*urls: str, secret: str | bytes | None = None) -> KVStore:
    """Build a store from one or more URLs; several make a TieredStore, fastest first.

    ``from_url("memory://?max_bytes=8GiB&device=cuda", "redis://host:6379/0?namespace=team1&ttl=3600")``.
    One string may also hold several URLs separated by commas. Query parameters:

    - ``memory://``: ``max_bytes`` (512MiB, 2GB, bytes), ``device``, ``namespace``, ``ttl``.
    - ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS), ``unix://``: ``namespace``
      (alias ``prefix``), ``ttl``, ``codec`` (raw, int8), ``device``, ``max_entry_bytes``,
      ``max_fetch_bytes`` and ``fetch_window`` (see :class:`RedisStore`), ``retry_after``, plus
      redis-py's own (``socket_timeout``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
      ``ssl_cert_reqs``, ``ssl_check_hostname``, ...).

    With no URL at all: ``$KVCOMM_STORE_URL``, else ``$KVCOMM_REDIS_URL``, else the local Redis.

    Args:
        secret: the entry-signing key of every Redis tier (None: ``$KVCOMM_STORE_KEY``).

    Raises:
        StoreError: an empty or unknown scheme, an unknown parameter, a secret in the URL, a bad
            value (one line, passwords redacted).
    """
    if not urls:
        urls = tuple(store_urls())
    flat = [u for url in urls for u in _SPLIT_RE.split(url.strip()) if u]
    if not flat:
        raise StoreError("no store URL given: use memory://, redis://host:6379/0 or both")
    named = {ns for ns in map(_namespace, flat) if ns is not None}
    if len(named) > 1:
        raise StoreError(f"the URLs of one tiered store name different namespaces: {sorted(named)}")
    namespace = named.pop() if named else "default"  # URLs without one inherit it
    stores: list[KVStore] = []
    try:
        for url in flat:
            scheme = urlsplit(url).scheme.lower()
            if scheme == "memory":
                stores.append(_memory(url, namespace))
            elif scheme in _REDIS_SCHEMES:
                stores.append(_redis(url, namespace, secret))
            else:
                raise StoreError(f"unknown store URL scheme in {redact(url)!r}: use memory://, redis://, rediss:// or unix://")
        return stores[0] if len(stores) == 1 else TieredStore(stores)
    except BaseException:
        for store in stores:
            store.close()
        raise
