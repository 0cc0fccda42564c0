"""MemoryStore byte budget and LRU, TieredStore promotion and write-through, from_url, exports."""

from __future__ import annotations

import inspect

import pytest
import torch
from store_helpers import assert_entries_equal, kv_entry

import kvcomm.store as store_pkg
from kvcomm.errors import StoreError, StoreFaultWarning
from kvcomm.store import KVEntry, KVStore, MemoryStore, RedisStore, TieredStore, from_url, parse_size


def _entry(nbytes: int) -> KVEntry:
    return KVEntry({"k": torch.zeros(nbytes, dtype=torch.uint8)})


def test_memory_round_trip_copies_on_put() -> None:
    store = MemoryStore(max_bytes=1 << 20)
    entry = kv_entry()
    assert store.put("a", entry)
    out = store.get("a", fingerprint="model-a")
    assert_entries_equal(entry, out)
    entry.tensors["k"].zero_()  # the caller's tensors are not the store's
    assert not torch.equal(out.tensors["k"], entry.tensors["k"])


def test_memory_never_exceeds_max_bytes_and_evicts_lru() -> None:
    store = MemoryStore(max_bytes=1000)
    for i in range(10):
        assert store.put(f"e{i}", _entry(100))
    assert store.stats()["bytes"] == 1000
    assert store.get("e0") is not None  # touched: e1 is now the least recently used
    assert store.put("e10", _entry(100))
    assert store.contains("e0") and not store.contains("e1")
    for i in range(40):  # mixed sizes: the budget holds after every put
        assert store.put(f"m{i}", _entry(50 + 97 * (i % 7)))
        s = store.stats()
        assert s["bytes"] == sum(store.get(k).nbytes for k in store.scan()) <= 1000
    assert store.stats()["evictions"] > 0


def test_memory_entry_larger_than_budget_is_not_stored() -> None:
    store = MemoryStore(max_bytes=1000)
    store.put("a", _entry(10))
    with pytest.warns(StoreFaultWarning, match="oversize"):
        assert not store.put("a", _entry(1001))  # the stale smaller value goes too
    assert store.scan() == [] and store.stats()["bytes"] == 0
    assert store.stats()["faults"]["oversize"] == 1


def test_memory_fingerprint_ttl_hashes_records() -> None:
    store = MemoryStore(ttl=0.05)
    store.put("a", kv_entry(fingerprint="m1"))
    with pytest.warns(StoreFaultWarning, match="fingerprint_mismatch"):
        assert store.get("a", fingerprint="m2") is None
    store.put("b", kv_entry(), ttl=0)
    import time

    time.sleep(0.1)
    assert store.get("a") is None and store.get("b") is not None and store.scan() == ["b"]
    assert store.pool_increment("h", "x", 2) == 2 and store.pool_increment("h", "x") == 3
    assert store.pool_write("h", {"y": 1.5}) and store.pool_read("h") == {"x": "3", "y": "1.5"}
    assert store.pool_remove("h", "x", "y") == 2 and store.pool_read("h") == {}
    store.append_record("r", {"i": 1})
    assert store.read_records("r") == [{"i": 1}]
    assert store.clear() == 2


def test_memory_rejects_bad_config() -> None:
    with pytest.raises(StoreError, match="max_bytes"):
        MemoryStore(max_bytes=-1)
    with pytest.raises(StoreError, match="device"):
        MemoryStore(device="nonsense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_memory_gpu_tier_holds_cuda_tensors() -> None:
    store = MemoryStore(device="cuda", max_bytes=1 << 24)
    entry = kv_entry()
    store.put("a", entry)
    out = store.get("a")
    assert out.tensors["k"].is_cuda
    assert_entries_equal(entry, out)


# -- tiered -------------------------------------------------------------------------------------
def test_tiered_promotes_and_writes_through(make_store, redis_url: str, namespace: str) -> None:
    fast = MemoryStore(max_bytes=1 << 20, namespace=namespace)
    slow = make_store(RedisStore, redis_url, namespace=namespace)
    tiered = TieredStore([fast, slow])
    entry = kv_entry()
    assert tiered.put("a", entry)
    assert fast.contains("a") and slow.contains("a")  # write-through

    # another process wrote "b" to Redis only: the first get reads through and promotes
    slow.put("b", entry)
    assert not fast.contains("b")
    assert_entries_equal(entry, tiered.get("b"))
    assert fast.contains("b") and tiered.stats()["promotions"] == 1
    reads = slow.stats()["hits"]
    assert_entries_equal(entry, tiered.get("b"))
    assert slow.stats()["hits"] == reads  # served by the fast tier now

    assert tiered.get("none") is None and tiered.stats()["misses"] == 1
    assert tiered.pool_increment("pool", "x", 2) == 2 and slow.pool_read("pool") == {"x": "2"}  # shared tier
    assert tiered.scan() == ["a", "b", "pool"]
    assert tiered.delete("a") and not fast.contains("a") and not slow.contains("a")
    assert tiered.clear() == 2 and slow.scan() == [] and fast.scan() == []


def test_tiered_put_is_true_when_a_tier_took_it(redis_url: str, namespace: str, make_store) -> None:
    tiny = MemoryStore(max_bytes=10, namespace=namespace)
    slow = make_store(RedisStore, redis_url, namespace=namespace)
    tiered = TieredStore([tiny, slow])
    with pytest.warns(StoreFaultWarning, match="oversize"):
        assert tiered.put("a", kv_entry())
    assert tiered.get("a") is not None and not tiny.contains("a")  # too big to promote: still served
    assert tiered.stats()["faults"]["oversize"] == 2
    slow.clear()


def test_tiered_rejects_mixed_namespaces() -> None:
    with pytest.raises(StoreError, match="namespace"):
        TieredStore([MemoryStore(namespace="a"), MemoryStore(namespace="b")])
    with pytest.raises(StoreError):
        TieredStore([])


# -- from_url -----------------------------------------------------------------------------------
def test_from_url_builds_stores(redis_url: str) -> None:
    mem = from_url("memory://?max_bytes=2MiB&device=cpu&ttl=5")
    assert isinstance(mem, MemoryStore) and mem.max_bytes == 2 << 20 and mem.ttl == 5
    red = from_url(f"{redis_url}?namespace=team1&ttl=3600&codec=int8&socket_timeout=2")
    assert isinstance(red, RedisStore) and (red.namespace, red.ttl, red.codec) == ("team1", 3600, "int8")
    red.close()
    tiered = from_url(f"memory://?max_bytes=1GB,{redis_url}?prefix=team2")
    assert isinstance(tiered, TieredStore) and [t.namespace for t in tiered.tiers] == ["team2", "team2"]
    assert tiered.tiers[0].max_bytes == 10**9
    tiered.close()


@pytest.mark.parametrize(
    "url, match",
    [
        ("ftp://x", "scheme"),
        ("", "no store URL"),
        ("memory://?max_bytes=lots", "max_bytes"),
        ("memory://host", "memory store URL"),
        ("redis://127.0.0.1:6379/0?colour=blue", "colour"),
        ("redis://127.0.0.1:99999/0", "port"),
        ("redis://127.0.0.1/0?ttl=-3", "ttl"),
        ("redis://127.0.0.1/0?namespace=a b", "namespace"),
        ("memory://?namespace=a,redis://127.0.0.1/0?namespace=b", "different namespaces"),
        ("redis://me:s3cret@127.0.0.1/0?x=1", r"\*\*\*"),
    ],
)
def test_from_url_errors_are_one_clear_line(url: str, match: str) -> None:
    with pytest.raises(StoreError, match=match) as info:
        from_url(url)
    assert "\n" not in str(info.value) and "s3cret" not in str(info.value)


def test_parse_size() -> None:
    assert parse_size("123") == 123 and parse_size("1KiB") == 1024 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("2mib") == 2 << 20 and parse_size("3G") == 3 * 10**9


# -- package surface ----------------------------------------------------------------------------
def test_exported_members() -> None:
    assert store_pkg.__all__ == sorted(store_pkg.__all__)
    for name in store_pkg.__all__:
        assert hasattr(store_pkg, name), name


@pytest.mark.parametrize("cls", [MemoryStore, RedisStore, TieredStore])
def test_every_store_implements_the_whole_interface(cls: type[KVStore]) -> None:
    assert not inspect.isabstract(cls)
    for name in ("get", "get_many", "put", "delete", "contains", "scan", "clear", "pool_read", "pool_read_many", "pool_write",
                 "pool_remove", "pool_increment",
                 "append_record", "read_records", "stats", "close", "ping", "usage"):
        base = inspect.signature(getattr(KVStore, name))
        assert inspect.signature(getattr(cls, name)).parameters.keys() == base.parameters.keys(), (cls, name)
