"""kvcomm.keys: every key type round-trips through its string, bad strings are refused."""

from __future__ import annotations

import pytest

from kvcomm.errors import KeyFormatError, StoreError
from kvcomm.keys import (
    ChunkKey,
    ContentKey,
    DeltaKey,
    MetricsKey,
    PoolKey,
    TemplateKey,
    is_chunk_key,
    is_metrics_key,
    model_id,
    namespace_prefix,
    parse_key,
)

MODEL = "0123456789abcdef"
HASH = "a1b2c3d4e5f6a1b2c3d4e5f6"

KEYS = [
    (ContentKey(MODEL, HASH), f"{MODEL}:content:{HASH}"),
    (DeltaKey(MODEL, HASH, "coder"), f"{MODEL}:delta:{HASH}:coder"),
    (DeltaKey(MODEL, HASH, "team:coder"), f"{MODEL}:delta:{HASH}:team:coder"),
    (TemplateKey(MODEL, "coder", HASH), f"{MODEL}:tmpl:coder:{HASH}"),
    (TemplateKey(MODEL, "team:coder", HASH), f"{MODEL}:tmpl:team:coder:{HASH}"),
    (PoolKey(MODEL, "question"), f"{MODEL}:pool:{{{MODEL}:question}}"),
    (PoolKey(MODEL, "agent:planner", "uses"), f"{MODEL}:uses:{{{MODEL}:agent:planner}}"),
    (PoolKey(MODEL, "doc:3", "seq"), f"{MODEL}:poolseq:{{{MODEL}:doc:3}}"),
    (PoolKey(MODEL, "odd}slot{"), f"{MODEL}:pool:{{{MODEL}:odd}}slot{{}}"),
    (MetricsKey(MODEL), f"{MODEL}:metrics"),
    (ChunkKey(f"{MODEL}:content:{HASH}", "00ff00ff00ff00ff", 0), f"~chunk:{{00ff00ff00ff00ff.0}}:{MODEL}:content:{HASH}"),
    (ChunkKey("seg:a", "0123abcd", 12), "~chunk:{0123abcd.12}:seg:a"),
]


@pytest.mark.parametrize(("key", "text"), KEYS, ids=[t for _, t in KEYS])
def test_round_trip(key, text) -> None:
    assert str(key) == text
    assert parse_key(text) == key
    assert parse_key(str(parse_key(text))) == key


@pytest.mark.parametrize("text", [
    "", "nomodel", f"{MODEL}:", f"{MODEL}:content", f"{MODEL}:content:", f"{MODEL}:content:XYZ",
    f"{MODEL}:delta:{HASH}", f"{MODEL}:delta:{HASH}:", f"{MODEL}:what:x", "notHEX!:metrics",
    f"{MODEL}:pool:", f"{MODEL}:metrics:extra", f"{MODEL}:pool:two words", f"{MODEL}:pool:question",
    f"{MODEL}:pool:{{{MODEL}:}}", f"{MODEL}:pool:{{ffffffffffffffff:q}}", f"{MODEL}:uses:{{{MODEL}:q",
    "~chunk:", "~chunk:{0123abcd.1}", "~chunk:{0123abcd.1}:", "~chunk:{0123abcd.01}:a", "~chunk:{0123.1}:a",
    "~chunk:{0123abcd.x}:a", "~chunk:{0123abcd.1}:~chunk:{0123abcd.1}:a", "~chunk:{0123ABCD.1}:a",
])
def test_bad_strings_are_refused(text) -> None:
    with pytest.raises(KeyFormatError):
        parse_key(text)


def _cluster_slot(key: str) -> int:
    """The Redis Cluster hash slot of a full key: CRC16 (XMODEM) of its hash tag, mod 16384."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


def test_a_pools_three_maps_share_one_cluster_slot_and_entries_spread() -> None:
    prefix = namespace_prefix("team1")
    for slot in ("question", "agent:planner", "doc:3", "odd}slot{"):
        slots = {_cluster_slot(prefix + str(PoolKey(MODEL, slot, part))) for part in ("members", "uses", "seq")}
        assert len(slots) == 1, slot
    entries = [prefix + str(ContentKey(MODEL, f"{i:024x}")) for i in range(64)]
    entries += [prefix + str(ChunkKey(str(ContentKey(MODEL, HASH)), "0123abcd", i)) for i in range(64)]
    assert len({_cluster_slot(k) * 3 // 16384 for k in entries}) == 3  # spread over three equal shards


def test_chunk_keys() -> None:
    key = ChunkKey("seg:a", "0123abcd", 3)
    assert is_chunk_key(str(key)) and not is_chunk_key("seg:a")
    with pytest.raises(KeyFormatError, match="chunk generation"):
        ChunkKey("seg:a", "xyz", 0)
    with pytest.raises(KeyFormatError, match="chunk index"):
        ChunkKey("seg:a", "0123abcd", -1)
    with pytest.raises(KeyFormatError, match="chunk key itself"):
        ChunkKey(str(key), "0123abcd", 0)


def test_errors_name_the_field_and_belong_to_the_store_family() -> None:
    with pytest.raises(KeyFormatError, match="content hash"):
        ContentKey(MODEL, "not hex")
    with pytest.raises(KeyFormatError, match="agent name"):
        DeltaKey(MODEL, HASH, "")
    with pytest.raises(KeyFormatError, match="pool part"):
        PoolKey(MODEL, "q", "bogus")  # type: ignore[arg-type]
    assert issubclass(KeyFormatError, StoreError)


def test_model_id_and_namespace_prefix() -> None:
    assert model_id(MODEL + "ffff") == MODEL
    with pytest.raises(KeyFormatError, match="fingerprint"):
        model_id("short")
    assert namespace_prefix("team1") == "kvcomm:team1:"


def test_metrics_keys_are_found_by_type_not_suffix() -> None:
    assert is_metrics_key(f"{MODEL}:metrics")
    assert not is_metrics_key(str(PoolKey(MODEL, "metrics")))  # a slot named "metrics" is a pool
    assert not is_metrics_key("garbage")
    assert str(DeltaKey(MODEL, HASH, "x")).startswith(DeltaKey.anchor_prefix(MODEL, HASH))
