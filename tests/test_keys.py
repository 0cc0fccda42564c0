"""kvcomm.keys: every key type round-trips through its string, bad strings are refused."""

from __future__ import annotations

import pytest

from kvcomm.errors import KeyFormatError, StoreError
from kvcomm.keys import (
    ContentKey,
    DeltaKey,
    MetricsKey,
    PoolKey,
    TemplateKey,
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
    (PoolKey(MODEL, "question"), f"{MODEL}:pool:question"),
    (PoolKey(MODEL, "agent:planner", "uses"), f"{MODEL}:uses:agent:planner"),
    (PoolKey(MODEL, "doc:3", "seq"), f"{MODEL}:poolseq:doc:3"),
    (MetricsKey(MODEL), f"{MODEL}:metrics"),
]


@pytest.mark.parametrize(("key", "text"), KEYS, ids=[t for _, t in KEYS])
def test_round_trip(key, text) -> None:
    assert str(key) == text
    assert parse_key(text) == key
    assert parse_key(str(parse_key(text))) == key


@pytest.mark.parametrize("text", [
    "", "nomodel", f"{MODEL}:", f"{MODEL}:content", f"{MODEL}:content:", f"{MODEL}:content:XYZ",
    f"{MODEL}:delta:{HASH}", f"{MODEL}:delta:{HASH}:", f"{MODEL}:what:x", "notHEX!:metrics",
    f"{MODEL}:pool:", f"{MODEL}:metrics:extra", f"{MODEL}:pool:two words",
])
def test_bad_strings_are_refused(text) -> None:
    with pytest.raises(KeyFormatError):
        parse_key(text)


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
    assert not is_metrics_key(f"{MODEL}:pool:metrics")  # a slot named "metrics" is a pool
    assert not is_metrics_key("garbage")
    assert str(DeltaKey(MODEL, HASH, "x")).startswith(DeltaKey.anchor_prefix(MODEL, HASH))
