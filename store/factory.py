"""from_url(): build a store (or a TieredStore of several) from store URLs or their specs."""

from __future__ import annotations

from dataclasses import replace

from kvcomm.store.base import KVStore
from kvcomm.store.memory import MemoryStore
from kvcomm.store.redis_store import RedisStore
from kvcomm.store.spec import MemorySpec, StoreSpec
from kvcomm.store.tiered import TieredStore
from kvcomm.store.url import parse_store_urls, store_urls_from_env


def open_store(spec: StoreSpec, *, secret: str | bytes | None = None) -> KVStore:
    """The store a spec describes (``secret``: the entry-signing key of a Redis tier)."""
    if isinstance(spec, MemorySpec):
        return MemoryStore.from_spec(spec)
    return RedisStore.from_spec(spec, secret=secret)


def from_url(*urls: str, secret: str | bytes | None = None, namespace: str | None = None) -> KVStore:
    """Build a store from one or more URLs; several make a TieredStore, fastest first.

    ``from_url("memory://?max_bytes=8GiB&device=cuda", "redis://host:6379/0?namespace=team1&ttl=3600")``.
    One string may also hold several URLs separated by commas. The query parameters of each
    scheme: :func:`kvcomm.store.url.parse_store_url`. With no URL at all:
    :func:`~kvcomm.store.url.store_urls_from_env` (``$KVCOMM_STORE_URL``, else
    ``$KVCOMM_REDIS_URL``, else the local Redis).

    Args:
        secret: the entry-signing key of every Redis tier (None: ``$KVCOMM_STORE_KEY``).
        namespace: if given, the namespace of every tier, over the one the URLs name (e.g. a
            fresh namespace per run without editing URL strings).

    Raises:
        StoreError: an empty or unknown scheme, an unknown parameter, a secret in the URL, a bad
            value (one line, passwords redacted).
    """
    specs = parse_store_urls(*(urls or store_urls_from_env()))
    if namespace is not None:
        specs = [replace(spec, namespace=namespace) for spec in specs]
    stores: list[KVStore] = []
    try:
        for spec in specs:
            stores.append(open_store(spec, secret=secret))
        return stores[0] if len(stores) == 1 else TieredStore(stores)
    except BaseException:
        for store in stores:
            store.close()
        raise
