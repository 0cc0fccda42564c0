"""Entries larger than chunk_bytes: chunk keys plus a manifest, on a real redis-server.

Byte-exact round trips; any one chunk truncated, deleted, lengthened or swapped (within the entry
or from another one) makes the entry a miss with a warning and a counter, never a wrong tensor;
overwrites, deletes, clears and TTLs take the chunks along; under maxmemory with allkeys-lru
eviction nothing wrong is ever returned.
"""

from __future__ import annotations

import random
import threading

import pytest
import redis
import torch
from store_helpers import assert_entries_equal

from kvcomm.errors import StoreFaultWarning
from kvcomm.keys import ChunkKey, namespace_prefix
from kvcomm.store import KVEntry, RedisStore
from kvcomm.store.chunks import MANIFEST_MAGIC, Manifest, parse

CHUNK = 64 << 10
SECRET = "chunk-test-secret-0123456789"


def _entry(seed: int, tokens: int = 200) -> KVEntry:
    """~1.2 MiB of fp32 KV (19 chunks of 64 KiB), a function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, 4, tokens, 48)
    return KVEntry({"k": torch.randn(shape, generator=g), "v": torch.randn(shape, generator=g),
                    "ids": torch.arange(tokens) + seed}, meta={"seed": seed}, fingerprint="m")


@pytest.fixture
def chunked(make_store, redis_url: str, namespace: str) -> RedisStore:
    store = make_store(RedisStore, redis_url, namespace=namespace, chunk_bytes=CHUNK, retry_after=0)
    yield store
    store.clear()


@pytest.fixture
def raw(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _manifest(raw: redis.Redis, store: RedisStore, key: str) -> Manifest:
    value = raw.get(namespace_prefix(store.namespace) + key)
    assert value is not None and value[:4] == MANIFEST_MAGIC
    return parse(value, max_total=1 << 40)


def _chunk(store: RedisStore, key: str, manifest: Manifest, i: int) -> str:
    return namespace_prefix(store.namespace) + str(ChunkKey(key, manifest.generation, i))


def _all_keys(raw: redis.Redis, store: RedisStore) -> list[bytes]:
    return sorted(raw.scan_iter(match=namespace_prefix(store.namespace) + "*", count=1000))


def test_round_trip_is_byte_exact_and_chunks_are_hidden(chunked: RedisStore, raw: redis.Redis) -> None:
    entry = _entry(1)
    assert chunked.put("big", entry) and chunked.put("small", _entry(2, tokens=2))
    manifest = _manifest(raw, chunked, "big")
    assert manifest.count == -(-manifest.total // CHUNK) >= 16 and manifest.chunk == CHUNK
    assert len(_all_keys(raw, chunked)) == 2 + manifest.count
    assert_entries_equal(entry, chunked.get("big", fingerprint="m"))
    big, small, missing = chunked.get_many(["big", "small", "missing"])
    assert_entries_equal(entry, big)
    assert_entries_equal(_entry(2, tokens=2), small)
    assert missing is None
    assert chunked.scan() == ["big", "small"] and chunked.contains("big")
    usage = chunked.usage()
    assert usage["keys"] == 2 and usage["entries"] == 2 and usage["chunks"] == manifest.count
    assert chunked.stats()["bytes_read"] >= 2 * manifest.total and sum(chunked.stats()["faults"].values()) == 0


DAMAGE = ["truncate", "delete", "lengthen", "swap_within", "swap_from_other"]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_any_damaged_chunk_makes_the_entry_a_miss(chunked: RedisStore, raw: redis.Redis, damage: str,
                                                   where: str) -> None:
    assert chunked.put("e", _entry(1)) and chunked.put("other", _entry(7))
    m, other = _manifest(raw, chunked, "e"), _manifest(raw, chunked, "other")
    i = {"first": 0, "middle": m.count // 2, "last": m.count - 1}[where]
    key = _chunk(chunked, "e", m, i)
    value = raw.get(key)
    if damage == "truncate":
        raw.set(key, value[:-1])
    elif damage == "delete":
        raw.delete(key)
    elif damage == "lengthen":
        raw.set(key, value + b"\0")
    elif damage == "swap_within":  # two chunks of the same length exchanged
        j = 1 if i == 0 else 0
        if where == "last":
            raw.set(key, raw.get(_chunk(chunked, "e", m, i - 1))[: len(value)])
        else:
            peer = _chunk(chunked, "e", m, j)
            raw.set(key, raw.get(peer))
            raw.set(peer, value)
    else:  # the same chunk of another entry (same size, other content)
        raw.set(key, raw.get(_chunk(chunked, "other", other, i)))
    kind = {"truncate": "truncated", "delete": "truncated", "lengthen": "corrupt"}.get(damage, "corrupt")
    with pytest.warns(StoreFaultWarning, match=kind):
        assert chunked.get("e") is None
    stats = chunked.stats()
    assert stats["faults"][kind] == 1 and stats["misses"] == 1 and stats["hits"] == 0
    assert chunked.get_many(["other", "e"])[1] is None  # in a batch too; the other entry is untouched
    assert_entries_equal(_entry(7), chunked.get("other"))


def test_signed_chunked_entries(make_store, redis_url: str, namespace: str, raw: redis.Redis) -> None:
    store = make_store(RedisStore, redis_url, namespace=namespace, chunk_bytes=CHUNK, secret=SECRET)
    assert store.put("a", _entry(1)) and store.put("b", _entry(2))
    assert_entries_equal(_entry(1), store.get("a"))
    prefix = namespace_prefix(namespace)
    m = _manifest(raw, store, "a")  # a's manifest and chunks copied under b's names: a whole, valid
    raw.set(prefix + "b", raw.get(prefix + "a"))  # value, signed for another key
    for i in range(m.count):
        raw.set(_chunk(store, "b", m, i), raw.get(_chunk(store, "a", m, i)))
    with pytest.warns(StoreFaultWarning, match="bad_mac"):
        assert store.get("b") is None
    assert store.stats()["faults"]["bad_mac"] == 1
    keyless = make_store(RedisStore, redis_url, namespace=namespace, chunk_bytes=CHUNK, secret="")
    assert keyless.put("c", _entry(3))
    with pytest.warns(StoreFaultWarning, match="unsigned"):
        assert store.get("c") is None
    store.clear()


def test_overwrite_delete_clear_and_ttl_take_the_chunks(chunked: RedisStore, raw: redis.Redis) -> None:
    assert chunked.put("e", _entry(1))
    first = _manifest(raw, chunked, "e")
    assert chunked.put("e", _entry(2))  # a new generation; the old chunks are gone
    second = _manifest(raw, chunked, "e")
    assert second.generation != first.generation
    assert not raw.exists(*[_chunk(chunked, "e", first, i) for i in range(first.count)])
    assert_entries_equal(_entry(2), chunked.get("e"))
    assert chunked.put("e", _entry(3, tokens=2))  # small now: no chunks left at all
    assert len(_all_keys(raw, chunked)) == 1
    assert chunked.put("e", _entry(4)) and chunked.delete("e") and _all_keys(raw, chunked) == []
    for key in ("seg:a", "seg:b", "keep"):
        assert chunked.put(key, _entry(5))
    assert chunked.clear("seg:") == 2 and chunked.scan() == ["keep"]
    assert len(_all_keys(raw, chunked)) == 1 + _manifest(raw, chunked, "keep").count
    assert chunked.put("t", _entry(6), ttl=60)
    m = _manifest(raw, chunked, "t")
    assert all(0 < raw.pttl(_chunk(chunked, "t", m, i)) <= 60_000 for i in range(m.count))


def test_bad_manifests_are_misses(chunked: RedisStore, raw: redis.Redis, make_store, redis_url: str) -> None:
    assert chunked.put("e", _entry(1))
    m = _manifest(raw, chunked, "e")
    full = namespace_prefix(chunked.namespace) + "e"
    raw.set(full, MANIFEST_MAGIC + b"\x01\x00\x00\x00garbage")
    with pytest.warns(StoreFaultWarning, match="corrupt"):
        assert chunked.get("e") is None
    lying = Manifest(m.generation, m.total, m.chunk, m.count + 1, m.head)  # count and total disagree
    raw.set(full, lying.encode())
    assert chunked.get("e") is None and chunked.stats()["faults"]["corrupt"] == 2
    small = make_store(RedisStore, redis_url, namespace=chunked.namespace, chunk_bytes=CHUNK,
                       max_entry_bytes=m.total - 1)
    raw.set(full, m.encode())
    with pytest.warns(StoreFaultWarning, match="oversize"):
        assert small.get("e") is None
    assert small.stats()["bytes_read"] == 0  # refused from the manifest: no chunk was read


def test_a_refused_write_leaves_no_chunks(fresh_redis, make_store) -> None:
    client = redis.Redis(port=fresh_redis.port)
    client.config_set("maxmemory", str(3 << 20))
    client.config_set("maxmemory-policy", "noeviction")
    store = make_store(RedisStore, fresh_redis.url, namespace="oom", chunk_bytes=CHUNK, retry_after=0)
    with pytest.warns(StoreFaultWarning, match="server_error: .*OOM"):
        assert store.put("huge", _entry(1, tokens=800)) is False  # ~5 MiB > 3 MiB: Redis refuses a chunk
    assert list(client.scan_iter(match="kvcomm:oom:*")) == []
    assert store.put("fits", _entry(2))
    client.close()


def test_eviction_never_returns_a_wrong_entry(fresh_redis, make_store) -> None:
    """maxmemory 6 MiB with allkeys-lru: ~40 MiB of chunked entries written while two threads read.
    Every entry read is the one last written under its key, byte for byte, or a miss."""
    client = redis.Redis(port=fresh_redis.port)
    client.config_set("maxmemory", str(6 << 20))
    client.config_set("maxmemory-policy", "allkeys-lru")
    store = make_store(RedisStore, fresh_redis.url, namespace="lru", chunk_bytes=CHUNK, retry_after=0)
    keys = [f"e{i}" for i in range(8)]
    expected: dict[str, set[int]] = {k: set() for k in keys}  # seeds ever written under each key
    wrong: list[str] = []
    stop = threading.Event()
    seen = {"hits": 0, "misses": 0}

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            batch = rng.sample(keys, 3)
            for key, entry in zip(batch, store.get_many(batch), strict=True):
                if entry is None:
                    seen["misses"] += 1
                    continue
                seen["hits"] += 1
                s = entry.meta["seed"]
                if s not in expected[key] or not torch.equal(entry.tensors["k"], _entry(s).tensors["k"]):
                    wrong.append(f"{key}: seed {s}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreFaultWarning)  # misses of evicted chunks are expected here
        for t in threads:
            t.start()
        try:
            for seed in range(32):
                key = keys[seed % len(keys)]
                expected[key].add(seed)
                store.put(key, _entry(seed))
        finally:
            stop.set()
            for t in threads:
                t.join()
    stats = store.stats()
    assert not wrong, wrong
    assert int(client.info("stats")["evicted_keys"]) > 0
    assert seen["hits"] > 0 and seen["misses"] > 0, seen
    assert stats["faults"]["truncated"] + stats["misses"] > 0
    client.close()
