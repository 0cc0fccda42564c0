"""Store test helpers: stores on the session's real redis-server, one namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvcomm.store import KVStore, RedisStore


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def make_store() -> Iterator[Callable[..., Any]]:
    """``make_store(cls, *args, **kwargs)``: builds a store and closes it after the test."""
    made: list[KVStore] = []

    def make(cls: type[KVStore], *args: Any, **kwargs: Any) -> Any:
        store = cls(*args, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def redis_store(make_store: Callable[..., Any], redis_url: str, namespace: str) -> RedisStore:
    store = make_store(RedisStore, redis_url, namespace=namespace, retry_after=0)
    yield store
    store.clear()


@pytest.fixture(scope="session")
def redis_cluster():
    """One real Redis Cluster of three masters for the whole session (do not kill its nodes)."""
    from cluster_servers import RedisClusterServers

    servers = RedisClusterServers()
    yield servers
    servers.cleanup()


@pytest.fixture
def fresh_cluster():
    """A Redis Cluster of this test's own (to kill a master)."""
    from cluster_servers import RedisClusterServers

    servers = RedisClusterServers()
    yield servers
    servers.cleanup()
