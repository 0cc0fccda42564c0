"""Signed entries on a real redis-server: tampering, forging, replay across keys and tenants, fuzzing,
bounded reads. Every bad value is a miss, a warning and a counter; none is a crash or a wrong KV."""

from __future__ import annotations

import hashlib
import random
import time
import tracemalloc

import blake3
import pytest
import redis
import torch
from store_helpers import assert_entries_equal, kv_entry

from kvcomm.errors import StoreFaultWarning
from kvcomm.keys import namespace_prefix
from kvcomm.store import EntryFormatError, KVEntry, MemoryStore, RedisStore, TieredStore, decode, encode
from kvcomm.store.codec import FLAG_BLAKE3, FLAG_SIGNED, MAC_BYTES, PREFIX_BYTES, frame, split

SECRET = b"team-secret-0123456789abcdef"
OTHER_SECRET = b"another-secret-0123456789abcdef"


@pytest.fixture
def signed(make_store, redis_url: str, namespace: str) -> RedisStore:
    store = make_store(RedisStore, redis_url, namespace=namespace, secret=SECRET, retry_after=0)
    yield store
    store.clear()


@pytest.fixture
def raw(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _rechecksum(value: bytes | bytearray) -> bytearray:
    """What anyone can do without the secret: recompute the checksum (BLAKE3 or SHA-256, as the
    value's flags say) of an edited value, by hand."""
    v = bytearray(value)
    header_off = PREFIX_BYTES + (MAC_BYTES if v[6] & FLAG_SIGNED else 0)
    h = blake3.blake3(bytes(v[4:12])) if v[6] & FLAG_BLAKE3 else hashlib.sha256(bytes(v[4:12]))
    h.update(bytes(v[header_off:]))
    v[12:44] = h.digest()
    return v


def _miss(store: RedisStore, key: str, kind: str) -> None:
    before = store.stats()
    with pytest.warns(StoreFaultWarning, match=kind) if kind not in store._warned else _nothing():
        assert store.get(key) is None
    after = store.stats()
    assert after["faults"][kind] == before["faults"][kind] + 1 and after["misses"] == before["misses"] + 1
    assert after["hits"] == before["hits"]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_signed_round_trip_and_stats(signed: RedisStore) -> None:
    entry = kv_entry()
    assert signed.put("e", entry)
    assert_entries_equal(entry, signed.get("e"))
    stats = signed.stats()
    assert stats["signed"] is True and stats["integrity"] == "hmac-sha256 (signed)"
    assert signed.usage()["signed_entries"] == 1 and signed.usage()["unsigned_entries"] == 0
    assert sum(stats["faults"].values()) == 0


def test_unsigned_store_says_so_and_still_checksums(redis_store: RedisStore, raw: redis.Redis) -> None:
    assert redis_store.put("e", kv_entry())
    stats, usage = redis_store.stats(), redis_store.usage()
    assert stats["signed"] is False and "unsigned" in stats["integrity"] and usage["unsigned_entries"] == 1
    full = namespace_prefix(redis_store.namespace) + "e"
    v = bytearray(raw.get(full))
    v[-3] ^= 1
    raw.set(full, bytes(v))
    _miss(redis_store, "e", "corrupt")


def test_flipped_payload_byte(signed: RedisStore, raw: redis.Redis) -> None:
    signed.put("e", kv_entry())
    full = namespace_prefix(signed.namespace) + "e"
    v = bytearray(raw.get(full))
    v[-3] ^= 0x01
    raw.set(full, bytes(v))
    _miss(signed, "e", "corrupt")  # the checksum catches the flip
    raw.set(full, bytes(_rechecksum(v)))
    _miss(signed, "e", "bad_mac")  # a recomputed checksum does not fool the MAC


def test_values_swapped_between_keys(signed: RedisStore, raw: redis.Redis) -> None:
    a, b = kv_entry(), kv_entry()
    signed.put("a", a)
    signed.put("b", b)
    ka, kb = namespace_prefix(signed.namespace) + "a", namespace_prefix(signed.namespace) + "b"
    va, vb = raw.get(ka), raw.get(kb)
    raw.set(ka, vb)
    raw.set(kb, va)
    _miss(signed, "a", "bad_mac")
    _miss(signed, "b", "bad_mac")
    # payload-only swap (same shapes, headers kept), checksums recomputed: still caught by the MAC
    pa, pb = split(va)[2], split(vb)[2]
    off = len(va) - len(pa)
    raw.set(ka, bytes(_rechecksum(bytes(va[:off]) + bytes(pb))))
    _miss(signed, "a", "bad_mac")


def test_replay_across_namespaces_is_a_miss(signed: RedisStore, raw: redis.Redis, make_store, redis_url: str) -> None:
    """Tenant isolation: tenant A's value copied under tenant B's key, with redis-py directly."""
    tenant_b = make_store(RedisStore, redis_url, namespace=signed.namespace + "-b", secret=SECRET)
    signed.put("content:x", kv_entry())
    raw.copy(namespace_prefix(signed.namespace) + "content:x", namespace_prefix(tenant_b.namespace) + "content:x")
    _miss(tenant_b, "content:x", "bad_mac")  # same secret, but the MAC binds the namespace
    # rewriting the header to name tenant B and recomputing the checksum fools a keyless store only
    _, header, payload = split(raw.get(namespace_prefix(signed.namespace) + "content:x"))
    header["namespace"] = tenant_b.namespace
    forged = frame(header, payload)
    raw.set(namespace_prefix(tenant_b.namespace) + "content:x", bytes(forged))
    keyless = make_store(RedisStore, redis_url, namespace=tenant_b.namespace, secret="")
    assert keyless.get("content:x") is not None
    _miss(tenant_b, "content:x", "unsigned")
    tenant_b.clear()


def test_forged_entries_without_the_secret(signed: RedisStore, raw: redis.Redis) -> None:
    full = namespace_prefix(signed.namespace) + "e"
    poison = KVEntry({"k": torch.full((2, 2, 4, 8), 1e4), "v": torch.zeros(2, 2, 4, 8)}, fingerprint="model-a")
    raw.set(full, bytes(encode(poison, namespace=signed.namespace, key="e")))  # no secret
    _miss(signed, "e", "unsigned")
    raw.set(full, bytes(encode(poison, namespace=signed.namespace, key="e", secret=OTHER_SECRET)))
    _miss(signed, "e", "bad_mac")
    v = bytearray(encode(poison, namespace=signed.namespace, key="e"))  # set the flag, invent a MAC
    forged = bytes(v[:6]) + bytes([v[6] | FLAG_SIGNED]) + bytes(v[7:PREFIX_BYTES]) + bytes(32) + bytes(v[PREFIX_BYTES:])
    raw.set(full, bytes(_rechecksum(forged)))
    _miss(signed, "e", "bad_mac")
    assert signed.stats()["hits"] == 0


def test_tiered_store_never_promotes_a_forged_entry(signed: RedisStore, raw: redis.Redis) -> None:
    tiered = TieredStore([MemoryStore(namespace=signed.namespace), signed])
    raw.set(namespace_prefix(signed.namespace) + "e", bytes(encode(kv_entry(), namespace=signed.namespace, key="e")))
    with pytest.warns(StoreFaultWarning, match="unsigned"):
        assert tiered.get("e") is None
    assert tiered.tiers[0].scan() == [] and tiered.stats()["signed"] is True
    assert tiered.stats()["faults"]["unsigned"] == 1


def test_keyless_reader_accepts_signed_entries_after_checksum(signed: RedisStore, make_store, redis_url: str) -> None:
    entry = kv_entry()
    signed.put("e", entry)
    keyless = make_store(RedisStore, redis_url, namespace=signed.namespace, secret="")
    assert_entries_equal(entry, keyless.get("e"))


# -- bounded reads ------------------------------------------------------------------------------------
def test_fetch_budget_per_window(make_store, redis_url: str, namespace: str) -> None:
    writer = make_store(RedisStore, redis_url, namespace=namespace)
    for key in ("a", "b"):
        writer.put(key, kv_entry())
    size = writer.stats()["bytes_written"] // 2
    reader = make_store(RedisStore, redis_url, namespace=namespace, max_fetch_bytes=size + size // 2, fetch_window=0.3)
    assert reader.get("a") is not None
    with pytest.warns(StoreFaultWarning, match="budget"):
        assert reader.get("b") is None  # would go over: at most the budget left crossed the wire
    assert reader.get("a") is None  # spent: nothing is read at all
    stats = reader.stats()
    assert stats["faults"]["budget"] == 2 and stats["hits"] == 1 and stats["max_fetch_bytes"] == size + size // 2
    time.sleep(0.35)  # the window rolls over
    assert reader.get("b") is not None
    writer.clear()


def test_malformed_headers_are_rejected_before_allocation() -> None:
    blob = encode(kv_entry(), namespace="n", key="k", codec="int8")
    _, header, payload = split(blob)
    cases = {
        "shape": [lambda h: h["tensors"][0].update(shape=[0, 2**40]),  # zero bytes, absurd dims
                  lambda h: h["tensors"][0]["scale"].update(shape=[2, 2, 8, 8]),
                  lambda h: h["tensors"][0].update(shape=[2 * 2 * 8 * 16])],  # int8 needs [..., T, D]
        "corrupt": [lambda h: h["tensors"][0].update(dtype="float64"),  # int8 kernels take fp16/32 only
                    lambda h: h["tensors"][0].update(codec="zstd"),
                    lambda h: h["tensors"][0].update(nbytes=-512),
                    lambda h: h["tensors"][0].update(scale=None)],
        "oversize": [lambda h: h["tensors"][0].update(shape=[1 << 20, 1 << 20], nbytes=1 << 40)],
    }
    for kind, mutations in cases.items():
        for mutate in mutations:
            h = split(blob)[1]
            mutate(h)
            with pytest.raises(EntryFormatError) as info:
                decode(bytes(frame(h, payload)), max_entry_bytes=1 << 20)
            assert info.value.kind == kind, (kind, h["tensors"][0])
    assert header["tensors"][0]["codec"] == "int8"


# -- fuzz ---------------------------------------------------------------------------------------------
_WEIRD = [-1, -(2**63), 2**64, 2**31, 0, 1, 3.5, None, True, "x", b"\x00", [], {}, [2**62, 2**62], [-1], [1] * 9,
          "float32", "int8", "complex64", "raw", "int8", "pickle", {"shape": [1], "offset": 0, "nbytes": 4}]
_FIELDS = ["name", "dtype", "shape", "codec", "offset", "nbytes", "scale"]


def _mutate_header(rng: random.Random, header: dict) -> None:
    spec = rng.choice(header["tensors"])
    for _ in range(rng.randrange(1, 4)):
        r = rng.random()
        if r < 0.6:
            spec[rng.choice(_FIELDS)] = rng.choice(_WEIRD)
        elif r < 0.7:
            spec.pop(rng.choice(_FIELDS), None)
        elif r < 0.8 and isinstance(spec.get("scale"), dict):
            spec["scale"][rng.choice(["shape", "offset", "nbytes"])] = rng.choice(_WEIRD)
        elif r < 0.9:
            header[rng.choice(["fingerprint", "namespace", "key", "meta", "tensors"])] = rng.choice(_WEIRD)
        elif isinstance(header["tensors"], list):
            header["tensors"] = header["tensors"] * rng.randrange(0, 3)


def test_fuzz_decoder_with_random_and_mutated_values() -> None:
    """1,200 values: random bytes, flipped/truncated bytes (signed and not), and re-framed headers
    with a valid checksum (fields set to absurd values) that only the validators can reject."""
    rng = random.Random(1234)
    limit = 1 << 16
    good = {codec: bytes(encode(kv_entry(tokens=4, dim=8), namespace="n", key="k", codec=codec))
            for codec in ("raw", "int8")}
    signed_good = bytes(encode(kv_entry(tokens=4, dim=8), namespace="n", key="k", secret=SECRET))
    kinds: dict[str, int] = {}
    accepted = 0
    tracemalloc.start()
    try:
        for i in range(1200):
            secret = None
            if i % 6 == 0:
                data = rng.randbytes(rng.randrange(0, 300))
                if rng.random() < 0.5:
                    data = b"KVCM" + data
            elif i % 6 in (1, 2):
                base = signed_good if i % 6 == 2 else good[rng.choice(["raw", "int8"])]
                secret = SECRET if i % 6 == 2 else None
                v = bytearray(base)
                for _ in range(rng.randrange(1, 6)):
                    v[rng.randrange(len(v))] = rng.randrange(256)
                if rng.random() < 0.3:
                    v = v[: rng.randrange(len(v) + 1)]
                elif secret is not None and rng.random() < 0.5:
                    v = _rechecksum(v)  # what a forger without the secret can do
                data = bytes(v)
            else:
                _, header, payload = split(good[rng.choice(["raw", "int8"])])
                _mutate_header(rng, header)
                try:
                    data = bytes(frame(header, payload))
                except Exception:  # noqa: BLE001 - msgpack cannot pack some mutations: skip those
                    continue
                secret = SECRET if rng.random() < 0.2 else None  # unsigned: rejected before parsing
            try:
                out = decode(data, namespace="n", key="k", max_entry_bytes=limit, secret=secret)
            except EntryFormatError as exc:
                kinds[exc.kind] = kinds.get(exc.kind, 0) + 1
                if secret is not None:  # authentication comes before the header is even parsed
                    assert exc.kind in ("corrupt", "truncated", "unsigned", "bad_mac", "version", "oversize"), exc
                continue
            accepted += 1  # a mutation that left a valid entry: decoded within the declared limit
            assert sum(t.numel() * t.element_size() for t in out.tensors.values()) <= 2 * limit
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(kinds.values()) >= 1000, kinds
    assert {"corrupt", "truncated", "shape", "bad_mac", "unsigned"} <= set(kinds), kinds
    assert accepted < 50, accepted
    assert peak < 4 << 20, f"peak Python allocation {peak} bytes while decoding values under {limit} bytes"
