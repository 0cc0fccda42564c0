"""Server faults on a real redis-server: killed, restarted, frozen (timeouts)."""

from __future__ import annotations

import signal

import pytest
from store_helpers import assert_entries_equal, kv_entry

from kvcomm.errors import StoreFaultWarning
from kvcomm.store import MemoryStore, RedisStore, TieredStore


def test_killed_server_degrades_and_recovers_after_restart(fresh_redis, make_store) -> None:
    store = make_store(RedisStore, fresh_redis.url, retry_after=0, socket_connect_timeout=1)
    entry = kv_entry()
    assert store.put("a", entry)

    fresh_redis.kill()
    with pytest.warns(StoreFaultWarning, match="unreachable"):
        assert store.get("a") is None
    assert store.put("a", entry) is False
    assert store.pool_increment("pool", "x") is None
    assert store.pool_read("pool") == {} and store.scan() == [] and not store.contains("a")
    assert store.append_record("m", {"x": 1}) is False and store.read_records("m") == []
    stats = store.stats()
    assert stats["faults"]["unreachable"] >= 8 and stats["misses"] == 1 and stats["put_failures"] == 1

    fresh_redis.start()  # same port, empty (no persistence)
    assert store.get("a") is None  # a plain miss, not a fault
    assert store.put("a", entry)
    assert_entries_equal(entry, store.get("a"))
    assert store.pool_increment("pool", "x") == 1
    faults = store.stats()["faults"]["unreachable"]

    fresh_redis.kill()  # a second outage warns again
    with pytest.warns(StoreFaultWarning, match="unreachable"):
        assert store.get("a") is None
    assert store.stats()["faults"]["unreachable"] == faults + 1


def test_retry_after_skips_a_dead_server(fresh_redis, make_store) -> None:
    store = make_store(RedisStore, fresh_redis.url, retry_after=60)
    fresh_redis.kill()
    with pytest.warns(StoreFaultWarning):
        assert store.get("a") is None
    for _ in range(50):  # no connection attempts for a minute: each call is a counted miss
        assert store.get("a") is None
    assert store.stats()["faults"]["unreachable"] == 51


def test_frozen_server_times_out(fresh_redis, make_store) -> None:
    store = make_store(RedisStore, fresh_redis.url, retry_after=0, socket_timeout=0.3)
    assert store.put("a", kv_entry())
    fresh_redis.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.warns(StoreFaultWarning, match="timeout"):
            assert store.get("a") is None
        assert store.stats()["faults"]["timeout"] == 1
    finally:
        fresh_redis.proc.send_signal(signal.SIGCONT)
    assert store.get("a") is not None  # the stale connection was dropped; a new one works


def test_tiered_keeps_serving_from_memory_when_redis_dies(fresh_redis, make_store) -> None:
    slow = make_store(RedisStore, fresh_redis.url, retry_after=0)
    tiered = TieredStore([MemoryStore(max_bytes=1 << 20), slow])
    entry = kv_entry()
    assert tiered.put("a", entry)
    fresh_redis.kill()
    assert_entries_equal(entry, tiered.get("a"))  # the fast tier still has it
    with pytest.warns(StoreFaultWarning, match="unreachable"):
        assert tiered.get("b") is None
        assert tiered.put("b", entry)  # stored in memory, Redis write degraded
    assert tiered.stats()["faults"]["unreachable"] >= 2
