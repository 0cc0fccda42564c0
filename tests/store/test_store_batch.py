"""get_many / pool_read_many (one pipelined round trip), the socket reader, receive buffers and the
checksum algorithms, on a real redis-server."""

from __future__ import annotations

import gc
import threading

import pytest
import redis
import torch
from store_helpers import assert_entries_equal, kv_entry

from kvcomm.errors import StoreFaultWarning
from kvcomm.keys import namespace_prefix
from kvcomm.store import MemoryStore, RedisStore, TieredStore, decode, encode
from kvcomm.store.buffers import MIN_POOLED, BufferPool
from kvcomm.store.codec import FLAG_BLAKE3


class Monitor:
    """The commands a real server receives (``MONITOR`` on a connection of its own)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _run(self) -> None:
        with self.client.monitor() as m:
            self._ready.set()
            for event in m.listen():
                self.lines.append(event["command"])
                if "kvcomm-monitor-stop" in event["command"]:
                    return

    def stop(self) -> list[str]:
        self.client.get("kvcomm-monitor-stop")
        self._thread.join(5)
        self.client.close()
        return [line for line in self.lines if "kvcomm-monitor-stop" not in line]


def test_get_many_order_duplicates_misses_and_faults(redis_store: RedisStore, redis_url: str) -> None:
    entries = {f"e{i}": kv_entry(tokens=i + 1) for i in range(5)}
    for key, entry in entries.items():
        assert redis_store.put(key, entry)
    redis.Redis.from_url(redis_url).set(namespace_prefix(redis_store.namespace) + "bad", b"NOPE" * 40)
    keys = ["e3", "missing", "e0", "e3", "bad", "e4"]
    with pytest.warns(StoreFaultWarning, match="corrupt"):
        got = redis_store.get_many(keys)
    assert got[1] is None and got[4] is None
    for key, entry in zip(keys, got, strict=True):
        if key in entries:
            assert_entries_equal(entries[key], entry)
    assert got[0] is not got[3]  # each key its own entry
    stats = redis_store.stats()
    assert stats["hits"] == 4 and stats["misses"] == 2 and stats["faults"]["corrupt"] == 1
    assert redis_store.get_many([]) == []


def test_get_many_is_one_round_trip(redis_store: RedisStore, redis_url: str) -> None:
    keys = [f"k{i}" for i in range(20)]
    for key in keys:
        redis_store.put(key, kv_entry())
    monitor = Monitor(redis_url)
    before = redis_store.stats()["round_trips"]
    assert all(e is not None for e in redis_store.get_many(keys, fingerprint="model-a"))
    assert redis_store.stats()["round_trips"] - before == 1
    maps = redis_store.pool_read_many(["p1", "p2", "p3"])
    assert maps == [{}, {}, {}] and redis_store.stats()["round_trips"] - before == 2
    commands = [c.split()[0] for c in monitor.stop() if redis_store.namespace in c]
    assert commands == ["GETRANGE"] * 20 + ["HGETALL"] * 3, commands


def test_pool_read_many_and_resp3(make_store, redis_url: str, namespace: str) -> None:
    for protocol in (2, 3):
        store = make_store(RedisStore, redis_url, namespace=namespace, protocol=protocol)
        assert store.pool_write("a", {"x": 1, "y": "two"}) and store.pool_increment("b", "n", 3) == 3
        assert store.pool_read_many(["a", "b", "c"]) == [{"x": "1", "y": "two"}, {"n": "3"}, {}]
        entry = kv_entry()
        assert store.put("e", entry)
        assert_entries_equal(entry, store.get_many(["e"])[0])
        assert sum(store.stats()["faults"].values()) == 0
        store.clear()


def test_tiered_get_many_asks_memory_first_and_promotes(make_store, redis_url: str, namespace: str) -> None:
    slow = make_store(RedisStore, redis_url, namespace=namespace)
    tiered = TieredStore([MemoryStore(namespace=namespace), slow])
    for i in range(4):
        assert slow.put(f"r{i}", kv_entry(tokens=i + 1))  # in Redis only
    assert tiered.put("m", kv_entry())  # in both
    trips = slow.stats()["round_trips"]
    got = tiered.get_many(["m", "r0", "r1", "nope"])
    assert [e is None for e in got] == [False, False, False, True]
    assert slow.stats()["round_trips"] - trips == 1  # one batch for the three the memory tier lacked
    assert tiered.stats()["promotions"] == 2 and tiered.tiers[0].contains("r0")
    trips = slow.stats()["round_trips"]
    assert all(e is not None for e in tiered.get_many(["m", "r0", "r1"]))
    assert slow.stats()["round_trips"] == trips  # all from memory now
    assert tiered.stats()["hits"] == 6 and tiered.stats()["misses"] == 1
    assert tiered.pool_read_many(["x"]) == [{}]


def test_decoded_tensors_view_a_reused_buffer(redis_store: RedisStore) -> None:
    entry = kv_entry(layers=4, heads=4, tokens=512, dim=64, dtype=torch.float32)  # 4 MiB: pooled
    assert redis_store.put("e", entry)
    first = redis_store.get("e")
    assert_entries_equal(entry, first)
    assert redis_store.stats()["buffers"]["buffers"] == 1
    second = redis_store.get("e")  # the first entry still lives: a second buffer
    assert second.tensors["k"].data_ptr() != first.tensors["k"].data_ptr()
    ptr = first.tensors["k"].data_ptr()
    del first, second
    gc.collect()
    third = redis_store.get("e")  # a free buffer is reused, not a new one
    assert_entries_equal(entry, third)
    buffers = redis_store.stats()["buffers"]
    assert buffers["allocated"] == 2 and buffers["reused"] == 1
    assert third.tensors["k"].data_ptr() in (ptr, third.tensors["k"].data_ptr())
    third.tensors["k"].add_(1)  # the caller owns its tensors: writing them changes nothing stored
    assert_entries_equal(entry, redis_store.get("e"))


def test_buffer_pool_reuses_free_buffers_within_its_limit() -> None:
    pool = BufferPool(max_bytes=8 << 20)
    small = pool.take(100)
    assert isinstance(small, bytearray) and len(small) == 100 and pool.stats()["buffers"] == 0  # not pooled
    a = pool.take(3 << 20)
    a_id, view = id(a), memoryview(a)
    del a
    b = pool.take(3 << 20)  # the first one is referenced (by the view): a new one
    assert id(b) != a_id and pool.stats()["bytes"] == 6 << 20
    del view
    c = pool.take(3 << 20)  # the first one is free again: reused
    assert id(c) == a_id and pool.stats()["reused"] == 1
    d = pool.take(5 << 20)  # over the limit with both in use: handed out, not kept
    assert len(d) == 5 << 20 and pool.stats()["buffers"] == 2
    del c
    e = pool.take(7 << 20)  # the free one is dropped to make room; still too big: not kept either
    assert len(e) == 7 << 20 and pool.stats()["buffers"] == 1 and pool.stats()["bytes"] == 3 << 20
    assert len(BufferPool(max_bytes=0).take(MIN_POOLED)) == MIN_POOLED and len(b) == 3 << 20


def test_blake3_and_sha256_entries_both_read(redis_url: str) -> None:
    entry = kv_entry()
    for digest in ("blake3", "sha256"):
        for secret in (None, b"k" * 16):
            blob = encode(entry, namespace="n", key="k", digest=digest, secret=secret)
            assert bool(blob[6] & FLAG_BLAKE3) == (digest == "blake3")
            assert_entries_equal(entry, decode(bytes(blob), namespace="n", key="k", secret=secret))
            flipped = bytearray(blob)
            flipped[6] ^= FLAG_BLAKE3  # the other algorithm's checksum cannot match
            with pytest.raises(Exception, match="checksum|MAC"):
                decode(bytes(flipped), namespace="n", key="k", secret=secret)


def test_socket_reader_replies_straight_into_sinks() -> None:
    """RESP2 and RESP3 replies from a socket pair: bulk payloads land in the sink's memory, a push
    message between replies is skipped, garbage and a closed socket are redis errors."""
    import socket

    from kvcomm.store.wire import SocketReader

    big = bytes(range(256)) * 1024  # 256 KiB: more than the reader's own buffer
    a, b = socket.socketpair()
    a.settimeout(10)
    replies = (b"$" + str(len(big)).encode() + b"\r\n" + big + b"\r\n" + b"$-1\r\n" + b"-NOPERM no\r\n"
               + b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n" + b"%1\r\n+f\r\n:7\r\n" + b"_\r\n" + b"$3\r\nabc\r\n")
    writer = threading.Thread(target=b.sendall, args=(replies,))  # more than a socket buffer holds
    writer.start()
    try:
        reader = SocketReader(a)
        dest = memoryview(bytearray(len(big)))
        first = reader.read(lambda n: dest if n == len(big) else None)
        assert first.kind == "bulk" and first.length == len(big) and bytes(dest) == big
        assert reader.read().kind == "nil"
        assert reader.read().error == "NOPERM no"
        assert reader.read().value == ["f", 7]  # the push message before it was skipped
        assert reader.read().kind == "nil"
        dropped = reader.read(lambda n: None)
        assert dropped.kind == "bulk" and dropped.length == 3 and dropped.data is None and reader.pending == 0
        writer.join(10)
        b.sendall(b"$x\r\n")
        with pytest.raises(redis.exceptions.InvalidResponse):
            reader.read()
        b.close()
        with pytest.raises(redis.ConnectionError):
            SocketReader(a).read()
    finally:
        a.close()
        b.close()
