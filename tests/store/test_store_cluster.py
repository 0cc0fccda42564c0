"""RedisStore on a real local Redis Cluster of three masters (redis-py's RedisCluster).

Round trips, namespaces, TTL, codec, signing; an anchor pool's three maps on one shard while
entries and the chunks of a large entry spread; one pipelined round trip per shard for a batch;
bytes and keys per shard (``usage`` and ``kvcomm store stats``); a master killed mid-pipeline:
its keys are misses with a warning, the other shards keep serving.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
import torch
from click.testing import CliRunner
from store_helpers import assert_entries_equal, kv_entry

from kvcomm.errors import StoreFaultWarning
from kvcomm.keys import ContentKey, PoolKey, namespace_prefix
from kvcomm.store import KVEntry, RedisStore, from_url
from kvcomm.tools.cli import main

SECRET = "cluster-test-secret-0123456789"
MODEL = "0123456789abcdef"


@pytest.fixture
def cluster_store(make_store, redis_cluster, namespace):
    store = make_store(RedisStore, redis_cluster.url, namespace=namespace, retry_after=0)
    yield store
    store.clear()


def _getrange_calls(servers) -> dict[int, int]:
    """GETRANGE commands each master has run so far (INFO commandstats)."""
    out = {}
    for port in servers.ports:
        with servers.client(port) as c:
            out[port] = int(c.info("commandstats").get("cmdstat_getrange", {}).get("calls", 0))
    return out


def test_round_trip_namespaces_and_codecs(cluster_store, make_store, redis_cluster, namespace) -> None:
    assert cluster_store.kind == "redis-cluster" and cluster_store.url == redis_cluster.url
    entries = {f"e{i}": kv_entry(tokens=4 + i, fingerprint="m") for i in range(12)}
    for key, entry in entries.items():
        assert cluster_store.put(key, entry)
    for key, entry in entries.items():
        assert_entries_equal(entry, cluster_store.get(key, fingerprint="m"))
    got = cluster_store.get_many([*entries, "missing"], fingerprint="m")
    for entry, out in zip(entries.values(), got, strict=False):
        assert_entries_equal(entry, out)
    assert got[-1] is None and cluster_store.scan() == sorted(entries)
    other = make_store(RedisStore, redis_cluster.url, namespace=namespace + "x")
    assert other.get("e0") is None and other.scan() == [] and other.get_many(["e0", "e1"]) == [None, None]
    # int8 over the cluster: about half the bytes, the same answer within a quantization step
    q = make_store(RedisStore, redis_cluster.url, namespace=namespace + "q", codec="int8")
    entry = kv_entry(layers=4, heads=4, tokens=64, dim=64, dtype=torch.bfloat16)
    assert q.put("e", entry)
    out = q.get("e")
    assert (out.tensors["k"].float() - entry.tensors["k"].float()).abs().max() <= entry.tensors["k"].float().abs().max() / 127
    q.clear()
    assert sum(cluster_store.stats()["faults"].values()) == 0


def test_ttl_on_the_cluster(make_store, redis_cluster, namespace) -> None:
    store = make_store(RedisStore, redis_cluster.url, namespace=namespace, ttl=3600)
    store.put("short", kv_entry(), ttl=0.3)
    store.put("default", kv_entry())
    for key in ("short", "default"):
        full = namespace_prefix(namespace) + key
        with redis_cluster.client(redis_cluster.port_of(full)) as c:
            pttl = c.pttl(full)
        assert (0 < pttl <= 300) if key == "short" else (3500_000 < pttl <= 3600_000)
    time.sleep(0.45)
    assert store.get("short") is None and store.get("default") is not None
    store.clear()


def test_signed_entries_and_tampering_on_the_cluster(make_store, redis_cluster, namespace) -> None:
    store = make_store(RedisStore, redis_cluster.url, namespace=namespace, secret=SECRET, retry_after=0)
    assert store.put("a", kv_entry()) and store.put("b", kv_entry(tokens=3))
    assert store.get("a") is not None and store.stats()["signed"]
    prefix = namespace_prefix(namespace)
    with redis_cluster.client(redis_cluster.port_of(prefix + "a")) as ca, \
            redis_cluster.client(redis_cluster.port_of(prefix + "b")) as cb:
        value = bytearray(ca.get(prefix + "a"))
        cb.set(prefix + "b", bytes(value))  # a's signed value copied to b (maybe another shard)
        value[-1] ^= 1
        ca.set(prefix + "a", bytes(value))
    with pytest.warns(StoreFaultWarning, match="bad_mac|corrupt"):
        assert store.get_many(["a", "b"]) == [None, None]
    faults = store.stats()["faults"]
    assert faults["corrupt"] + faults["bad_mac"] == 2
    unsigned = make_store(RedisStore, redis_cluster.url, namespace=namespace, secret="")
    assert unsigned.put("c", kv_entry())
    with pytest.warns(StoreFaultWarning, match="unsigned"):
        assert store.get("c") is None
    store.clear()


def test_a_pools_maps_share_a_shard_entries_and_chunks_spread(make_store, redis_cluster, namespace) -> None:
    store = make_store(RedisStore, redis_cluster.url, namespace=namespace, chunk_bytes=64 << 10)
    prefix = namespace_prefix(namespace)
    for slot in ("question", "agent:planner", "doc:3"):
        keys = [str(PoolKey(MODEL, slot, part)) for part in ("members", "uses", "seq")]
        for key in keys:
            assert store.pool_increment(key, "n") == 1
        assert len({redis_cluster.port_of(prefix + k) for k in keys}) == 1, slot
        with redis_cluster.client(redis_cluster.port_of(prefix + keys[0])) as c:  # MULTI over them works
            pipe = c.pipeline(transaction=True)
            for key in keys:
                pipe.hincrby(prefix + key, "n", 1)
            assert pipe.execute() == [2, 2, 2]
    contents = [str(ContentKey(MODEL, f"{i:024x}")) for i in range(30)]
    for key in contents:
        assert store.put(key, kv_entry(tokens=1))
    assert {redis_cluster.port_of(prefix + k) for k in contents} == set(redis_cluster.ports)
    big = kv_entry(layers=4, heads=4, tokens=128, dim=64, dtype=torch.float32)  # ~1 MiB: 16 chunks
    assert store.put("big", big)
    usage = store.usage()
    assert usage["chunks"] >= 16 and sum(row["chunks"] > 0 for row in usage["shards"]) == 3
    assert_entries_equal(big, store.get("big"))
    store.clear()


def test_get_many_is_one_pipelined_round_trip_per_shard(cluster_store, redis_cluster) -> None:
    keys = [f"k{i}" for i in range(30)]
    for key in keys:
        cluster_store.put(key, kv_entry(tokens=2))
    prefix = namespace_prefix(cluster_store.namespace)
    per_shard = {p: sum(redis_cluster.port_of(prefix + k) == p for k in keys) for p in redis_cluster.ports}
    assert all(per_shard.values())  # every shard holds some
    before, calls = cluster_store.stats()["round_trips"], _getrange_calls(redis_cluster)
    got = cluster_store.get_many(keys)
    assert all(entry is not None for entry in got)
    assert cluster_store.stats()["round_trips"] - before == 3  # one per shard, sent at once
    after = _getrange_calls(redis_cluster)
    assert {p: after[p] - calls[p] for p in redis_cluster.ports} == per_shard
    before = cluster_store.stats()["round_trips"]
    maps = cluster_store.pool_read_many([str(PoolKey(MODEL, f"s{i}")) for i in range(10)])
    assert maps == [{}] * 10 and cluster_store.stats()["round_trips"] - before <= 3


def test_usage_and_cli_stats_per_shard(cluster_store, redis_cluster) -> None:
    for i in range(9):
        cluster_store.put(f"e{i}", kv_entry())
    cluster_store.pool_increment("p", "a")
    usage = cluster_store.usage()
    assert usage["keys"] == 10 and usage["entries"] == 9
    assert sorted(row["node"] for row in usage["shards"]) == sorted(f"127.0.0.1:{p}" for p in redis_cluster.ports)
    assert sum(row["keys"] for row in usage["shards"]) == 10
    assert sum(row["entry_bytes"] for row in usage["shards"]) == usage["entry_bytes"] > 0
    url = f"{redis_cluster.url}?namespace={cluster_store.namespace}"
    out = CliRunner().invoke(main, ["store", "stats", "--store", url, "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["kind"] == "redis-cluster" and len(info["shards"]) == 3 and info["keys"] == 10
    out = CliRunner().invoke(main, ["store", "stats", "--store", url])
    assert out.exit_code == 0, out.output
    for port in redis_cluster.ports:
        assert f"127.0.0.1:{port}" in out.output
    assert "entry bytes" in out.output


def test_from_url_several_startup_nodes_and_bad_nodes(redis_cluster, namespace) -> None:
    store = from_url(f"redis+cluster://127.0.0.1:1,{redis_cluster.url_all[len('redis+cluster://'):]}"
                     f"?namespace={namespace}")
    try:
        assert store.put("a", kv_entry()) and store.get("a") is not None  # the dead startup node is skipped
        store.ping()
        store.clear()
    finally:
        store.close()
    dead = RedisStore("redis+cluster://127.0.0.1:1", namespace=namespace, socket_connect_timeout=0.5, retry_after=60)
    with pytest.warns(StoreFaultWarning, match="unreachable"):
        assert dead.get("a") is None and dead.put("a", kv_entry()) is False
    assert dead.get_many(["a", "b"]) == [None, None] and dead.scan() == []
    assert dead.stats()["faults"]["unreachable"] >= 4
    dead.close()


def test_killed_master_mid_pipeline_misses_its_keys_others_serve(fresh_cluster, make_store) -> None:
    ns = "kill" + uuid.uuid4().hex[:6]
    store = make_store(RedisStore, fresh_cluster.url, namespace=ns, retry_after=30, socket_connect_timeout=0.5)
    keys = [f"e{i}" for i in range(30)]
    entries = {key: KVEntry({"x": torch.full((64,), i)}, meta={"i": i}) for i, key in enumerate(keys)}
    for key, entry in entries.items():
        assert store.put(key, entry)
    prefix = namespace_prefix(ns)
    where = {key: fresh_cluster.port_of(prefix + key) for key in keys}
    dead = where["e0"]
    batch = store.get_many(keys[:10])  # the first half of a pipeline of reads, before the master dies
    fresh_cluster.kill(dead)
    t0 = time.perf_counter()
    with pytest.warns(StoreFaultWarning, match=f"unreachable: .*127.0.0.1:{dead}"):
        batch += store.get_many(keys[10:])
    first = time.perf_counter() - t0
    for key, entry in zip(keys, batch, strict=True):
        if key in keys[10:] and where[key] == dead:
            assert entry is None, key
        else:
            assert_entries_equal(entries[key], entry)
    lost = sum(where[k] == dead for k in keys[10:])
    assert store.stats()["faults"]["unreachable"] == lost
    t0 = time.perf_counter()
    again = store.get_many(keys)  # the dead shard is skipped for retry_after: no connection attempts
    assert time.perf_counter() - t0 < max(1.0, first)
    assert [e is None for e in again] == [where[k] == dead for k in keys]
    live = next(k for k in keys if where[k] != dead)
    assert store.put(live, entries[live]) and store.pool_increment(live + ":pool", "n") in (1, None)
    assert store.put(next(k for k in keys if where[k] == dead), kv_entry()) is False
    stats = store.stats()
    assert stats["hits"] >= 30 - 2 * lost and stats["faults"]["unreachable"] > lost
    with redis.Redis(port=next(p for p in fresh_cluster.ports if p != dead)) as c:  # the survivors agree
        assert c.ping()


def test_a_stale_slot_map_is_mended_by_the_moved_reply(cluster_store, recwarn) -> None:
    """A key routed by a stale slot map (as after a failover or a reshard) reaches a master that
    no longer holds it, which answers MOVED: the store reads the map again and retries once, so the
    operation lands where the key lives, with no fault and no warning."""
    from redis.crc import key_slot

    key = "pool-moved-probe"
    full = cluster_store._full(key)
    manager = cluster_store.topology.client.nodes_manager
    slot = key_slot(full.encode("utf-8"))
    owner = manager.slots_cache[slot][0]
    other = next(n for n in cluster_store.topology.client.get_primaries() if n.name != owner.name)
    faults = cluster_store.stats()["faults"]
    manager.slots_cache[slot] = [other]  # the map now sends this key to the wrong master
    assert cluster_store.topology.node_for(full).name == other.name
    assert cluster_store.pool_write(key, {"uses": 1})  # MOVED, map read again, written on the owner
    assert cluster_store.topology.node_for(full).name == owner.name
    assert cluster_store.pool_increment(key, "uses", 2) == 3
    assert cluster_store.pool_read(key) == {"uses": "3"}
    assert cluster_store.stats()["faults"] == faults
    assert not [w for w in recwarn if issubclass(w.category, StoreFaultWarning)]
