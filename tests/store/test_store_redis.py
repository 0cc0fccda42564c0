"""RedisStore on a real redis-server: round trips, every bad entry a miss, TTL, namespaces, counters."""

from __future__ import annotations

import time

import pytest
import redis
import torch
from store_helpers import assert_entries_equal, kv_entry

from kvcomm.errors import StoreError, StoreFaultWarning
from kvcomm.keys import namespace_prefix
from kvcomm.store import KVEntry, RedisStore, encode
from kvcomm.store.codec import FORMAT_VERSION, frame, split


def _raw_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_round_trip_bit_exact(redis_store: RedisStore, dtype: torch.dtype) -> None:
    entry = KVEntry({"k": (torch.randn(2, 3, 5, 8) * 50).to(dtype), "v": (torch.randn(2, 3, 5, 8) * 50).to(dtype)},
                    meta={"slot": "question", "lens": [5]}, fingerprint="m")
    assert redis_store.put("content:abc", entry)
    assert_entries_equal(entry, redis_store.get("content:abc", fingerprint="m"))
    stats = redis_store.stats()
    assert stats["hits"] == 1 and stats["puts"] == 1 and stats["bytes_read"] == stats["bytes_written"] > entry.nbytes
    assert sum(stats["faults"].values()) == 0


def test_4mib_value_round_trips_through_a_real_server(redis_store: RedisStore) -> None:
    # 4 MiB of bf16 KV: k and v [8, 8, 256, 64] x 2 bytes each
    entry = kv_entry(layers=8, heads=8, tokens=256, dim=64, dtype=torch.bfloat16)
    assert entry.tensors["k"].nbytes + entry.tensors["v"].nbytes == 4 << 20
    assert redis_store.put("big", entry)
    assert_entries_equal(entry, redis_store.get("big"))


def test_keys_are_prefixed_with_namespace(redis_store: RedisStore, redis_url: str) -> None:
    redis_store.put("a:b", kv_entry())
    assert _raw_client(redis_url).exists(namespace_prefix(redis_store.namespace) + "a:b")
    assert redis_store.scan() == ["a:b"] and redis_store.contains("a:b")
    assert redis_store.delete("a:b") and not redis_store.contains("a:b") and not redis_store.delete("a:b")


def test_missing_key_is_a_plain_miss(redis_store: RedisStore) -> None:
    assert redis_store.get("nothing") is None
    stats = redis_store.stats()
    assert stats["misses"] == 1 and sum(stats["faults"].values()) == 0


def test_int8_store_moves_about_half_the_bytes(make_store, redis_url: str, namespace: str) -> None:
    raw = make_store(RedisStore, redis_url, namespace=namespace)
    q = make_store(RedisStore, redis_url, namespace=namespace, codec="int8")
    entry = kv_entry(layers=4, heads=4, tokens=128, dim=64, dtype=torch.bfloat16)
    raw.put("raw", entry)
    q.put("q", entry)
    assert q.stats()["bytes_written"] <= 0.55 * raw.stats()["bytes_written"]
    out = q.get("q")
    err = (out.tensors["k"].float() - entry.tensors["k"].float()).abs()
    assert err.max() <= entry.tensors["k"].float().abs().max() / 127
    assert torch.equal(out.tensors["ids"], entry.tensors["ids"])
    raw.clear()


# -- every bad entry is a miss, a warning and a counter ---------------------------------------
def _craft(redis_url: str, store: RedisStore, key: str, value: bytes | bytearray) -> None:
    _raw_client(redis_url).set(namespace_prefix(store.namespace) + key, bytes(value))


def _good(store: RedisStore, key: str = "e") -> bytearray:
    return encode(kv_entry(fingerprint="model-a"), namespace=store.namespace, key=key)


def _flip_payload(v: bytearray) -> bytearray:
    v[-3] ^= 0x40
    return v


def _reframe(v: bytearray, *, version: int = FORMAT_VERSION, **spec: object) -> bytearray:
    _, header, payload = split(v)
    header["tensors"][0].update(spec)
    return frame(header, payload, version=version)


CORRUPTIONS = {
    "corrupt": _flip_payload,
    "truncated": lambda v: v[: len(v) - 100],
    "version": lambda v: _reframe(v, version=FORMAT_VERSION + 7),
    "shape": lambda v: _reframe(v, shape=[2, 2, 8, 15]),
    "oversize": lambda v: _reframe(v, shape=[1 << 30, 1 << 30], nbytes=1 << 61),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_bad_entry_is_a_miss_with_warning_and_counter(redis_store: RedisStore, redis_url: str, kind: str) -> None:
    _craft(redis_url, redis_store, "e", CORRUPTIONS[kind](_good(redis_store)))
    with pytest.warns(StoreFaultWarning, match=kind):
        assert redis_store.get("e") is None
    stats = redis_store.stats()
    assert stats["faults"][kind] == 1 and stats["misses"] == 1 and stats["hits"] == 0
    assert sum(stats["faults"].values()) == 1


def test_wrong_fingerprint_is_a_miss(redis_store: RedisStore) -> None:
    redis_store.put("e", kv_entry(fingerprint="model-a"))
    with pytest.warns(StoreFaultWarning, match="fingerprint_mismatch"):
        assert redis_store.get("e", fingerprint="model-b") is None
    assert redis_store.get("e", fingerprint="model-a") is not None
    assert redis_store.stats()["faults"]["fingerprint_mismatch"] == 1


def test_value_too_large_is_never_fully_read(make_store, redis_url: str, namespace: str) -> None:
    small = make_store(RedisStore, redis_url, namespace=namespace, max_entry_bytes=4096)
    big = encode(kv_entry(tokens=256), namespace=namespace, key="e")
    _craft(redis_url, small, "e", big)
    with pytest.warns(StoreFaultWarning, match="oversize"):
        assert small.get("e") is None
    assert small.stats()["bytes_read"] == 0 and small.stats()["faults"]["oversize"] == 1
    assert not small.put("e", kv_entry(tokens=256))  # counted; warned once per kind already
    assert not small.contains("e")  # the stale value went with the refused write
    assert small.stats()["faults"]["oversize"] == 2


def test_value_swapped_between_keys_or_namespaces_is_a_miss(redis_store: RedisStore, redis_url: str,
                                                             make_store) -> None:
    redis_store.put("a", kv_entry())
    client = _raw_client(redis_url)
    client.copy(namespace_prefix(redis_store.namespace) + "a", namespace_prefix(redis_store.namespace) + "b")
    other = make_store(RedisStore, redis_url, namespace=redis_store.namespace + "x")
    client.copy(namespace_prefix(redis_store.namespace) + "a", namespace_prefix(other.namespace) + "a")
    with pytest.warns(StoreFaultWarning, match="key_mismatch"):
        assert redis_store.get("b") is None
    with pytest.warns(StoreFaultWarning, match="key_mismatch"):
        assert other.get("a") is None
    other.clear()


def test_warns_once_per_kind_but_counts_every_fault(redis_store: RedisStore, redis_url: str) -> None:
    _craft(redis_url, redis_store, "e", _flip_payload(_good(redis_store)))
    with pytest.warns(StoreFaultWarning) as record:
        for _ in range(3):
            assert redis_store.get("e") is None
    assert len(record) == 1
    assert redis_store.stats()["faults"]["corrupt"] == 3


def test_wrong_redis_type_under_key_is_a_miss(redis_store: RedisStore) -> None:
    redis_store.pool_increment("h", "f")
    with pytest.warns(StoreFaultWarning, match="server_error"):
        assert redis_store.get("h") is None


# -- TTL, namespaces, counters, records ------------------------------------------------------------
def test_ttl_expires_on_a_real_server(make_store, redis_url: str, namespace: str) -> None:
    store = make_store(RedisStore, redis_url, namespace=namespace, ttl=3600)
    store.put("short", kv_entry(), ttl=0.3)
    store.put("default", kv_entry())
    store.put("forever", kv_entry(), ttl=0)
    client = _raw_client(redis_url)
    assert 0 < client.pttl(namespace_prefix(namespace) + "short") <= 300
    assert 3500_000 < client.pttl(namespace_prefix(namespace) + "default") <= 3600_000
    assert client.pttl(namespace_prefix(namespace) + "forever") == -1
    assert store.get("short") is not None
    time.sleep(0.45)
    assert store.get("short") is None and store.get("default") is not None
    assert sum(store.stats()["faults"].values()) == 0
    store.clear()


def test_namespaces_isolate(make_store, redis_url: str, namespace: str) -> None:
    a = make_store(RedisStore, redis_url, namespace=namespace + "a")
    b = make_store(RedisStore, redis_url, namespace=namespace + "b")
    a.put("k", kv_entry())
    a.pool_increment("pool", "n", 5)
    a.append_record("m", {"x": 1})
    assert b.get("k") is None and not b.contains("k") and b.scan() == []
    assert b.pool_read("pool") == {} and b.read_records("m") == []
    assert b.clear() == 0 and a.scan() == ["k", "m", "pool"]
    assert a.clear() == 3 and a.scan() == []


def test_counters_hashes_and_records(redis_store: RedisStore) -> None:
    assert redis_store.pool_increment("pool:q", "anchor1") == 1
    assert redis_store.pool_increment("pool:q", "anchor1", 4) == 5
    assert redis_store.pool_write("pool:q", {"len:anchor1": 12, "w": 0.5})
    assert redis_store.pool_read("pool:q") == {"anchor1": "5", "len:anchor1": "12", "w": "0.5"}
    assert redis_store.pool_remove("pool:q", "w", "missing") == 1
    for i in range(3):
        assert redis_store.append_record("metrics", {"call": i, "mode": "reuse"})
    assert [r["call"] for r in redis_store.read_records("metrics")] == [0, 1, 2]
    with pytest.raises(StoreError, match="JSON"):
        redis_store.append_record("metrics", {"x": object()})


def test_scan_prefix_is_literal_and_clear_counts(redis_store: RedisStore) -> None:
    for key in ("seg:a", "seg:b", "se*g", "anchor:x"):
        redis_store.put(key, kv_entry(tokens=1))
    assert redis_store.scan("seg:") == ["seg:a", "seg:b"]
    assert redis_store.scan("se*") == ["se*g"]
    assert redis_store.clear("seg:") == 2 and redis_store.scan() == ["anchor:x", "se*g"]
    assert redis_store.usage()["entries"] == 2


def test_bad_keys_and_arguments_raise(redis_store: RedisStore, redis_url: str) -> None:
    for key in ("", "a b", "tab\tkey"):
        with pytest.raises(StoreError, match="key"):
            redis_store.get(key)
    with pytest.raises(StoreError, match="namespace"):
        RedisStore(redis_url, namespace="a:b")
    with pytest.raises(StoreError, match="codec"):
        RedisStore(redis_url, codec="zip")


def test_ping_raises_one_line_error_without_password() -> None:
    store = RedisStore("redis://user:hunter2@127.0.0.1:1/0", socket_connect_timeout=0.5)
    with pytest.raises(StoreError) as info:
        store.ping()
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    store.close()
