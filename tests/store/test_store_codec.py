"""The stored format: bit-exact raw round trips, int8 size and error, every malformed value rejected."""

from __future__ import annotations

import random

import pytest
import torch
from store_helpers import assert_entries_equal, kv_entry

from kvcomm.errors import EntryFormatError as ErrorsEntryFormatError
from kvcomm.errors import StoreError, StoreFormatError
from kvcomm.kernels.quant import dequantize_kv_reference, quantize_kv_reference
from kvcomm.store import FORMAT_VERSION, EntryFormatError, KVEntry, decode, encode
from kvcomm.store.codec import MAX_NDIM, frame, split


def _decode_kind(blob: bytes | bytearray, **kwargs) -> str:
    with pytest.raises(EntryFormatError) as info:
        decode(bytes(blob), **kwargs)
    assert isinstance(info.value, StoreFormatError)
    return info.value.kind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool])
def test_raw_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 2, 7, 5) * 100).to(dtype)
    if dtype.is_floating_point:  # NaN/inf/-0.0 payloads must survive too
        t.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)
    entry = KVEntry({"x": t, "empty": torch.empty(0, 4, dtype=dtype)}, meta={"a": [1, "b", None], "n": {"x": 1.5}},
                    fingerprint="fp")
    out = decode(encode(entry, namespace="ns", key="k"), namespace="ns", key="k", fingerprint="fp")
    assert_entries_equal(entry, out)


def test_raw_decode_owns_its_memory() -> None:
    entry = kv_entry()
    blob = bytearray(encode(entry, namespace="ns", key="k"))
    out = decode(blob)
    blob[-64:] = bytes(64)  # scribbling on the value afterwards must not reach the tensors
    assert_entries_equal(entry, out)


def test_non_contiguous_tensors_round_trip() -> None:
    base = torch.randn(4, 6, 8)
    entry = KVEntry({"k": base.transpose(0, 2), "v": base[:, ::2]})
    assert_entries_equal(entry, decode(encode(entry, namespace="n", key="k")))


def test_int8_halves_bf16_bytes_and_bounds_the_error() -> None:
    entry = kv_entry(layers=4, heads=4, tokens=64, dim=64, dtype=torch.bfloat16)
    raw = encode(entry, namespace="n", key="k", codec="raw")
    q = encode(entry, namespace="n", key="k", codec="int8")
    assert len(q) <= 0.55 * len(raw), (len(q), len(raw))
    out = decode(q)
    assert torch.equal(out.tensors["ids"], entry.tensors["ids"])  # non-KV tensors stay raw
    for name, reduce_dim in (("k", -2), ("v", -1)):
        x, y = entry.tensors[name].float(), out.tensors[name]
        assert y.dtype == torch.bfloat16 and y.shape == x.shape
        # symmetric round-to-nearest: |err| <= amax/254 per scale group, plus bf16 output rounding
        bound = x.abs().amax(dim=reduce_dim, keepdim=True) / 254 + x.abs() * 2**-8 + 1e-6
        assert ((y.float() - x).abs() <= bound).all(), name
        assert (y.float() - x).abs().mean() < 0.01 * x.abs().mean() + 1e-3


def test_int8_reference_scale_layout() -> None:
    x = torch.randn(2, 3, 5, 8)
    qk, sk = quantize_kv_reference(x, "k")
    qv, sv = quantize_kv_reference(x, "v")
    assert qk.dtype == torch.int8 and sk.shape == (2, 3, 1, 8) and sv.shape == (2, 3, 5, 1)
    assert torch.allclose(dequantize_kv_reference(qk, sk, torch.float32), x, atol=float(sk.max()) / 2 + 1e-6)
    assert torch.allclose(dequantize_kv_reference(qv, sv, torch.float32), x, atol=float(sv.max()) / 2 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_codec_stores_the_kernels_reference(dtype: torch.dtype) -> None:
    """One int8 reference: the stored q and scales are kvcomm.kernels.quant's, bit for bit."""
    x = (torch.randn(2, 3, 9, 16) * 3).to(dtype)
    blob = encode(KVEntry({"k": x, "v": x}), namespace="n", key="k", codec="int8")
    _, header, payload = split(blob)
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    for spec in header["tensors"]:
        q_ref, s_ref = quantize_kv_reference(x, spec["name"])
        q = raw[spec["offset"] : spec["offset"] + spec["nbytes"]].view(torch.int8).reshape(spec["shape"])
        s = spec["scale"]
        scale = raw[s["offset"] : s["offset"] + s["nbytes"]].view(torch.float32).reshape(s["shape"])
        assert torch.equal(q, q_ref) and torch.equal(scale, s_ref), spec["name"]
    out = decode(blob)
    for name, (q_ref, s_ref) in (("k", quantize_kv_reference(x, "k")), ("v", quantize_kv_reference(x, "v"))):
        assert torch.equal(out.tensors[name], dequantize_kv_reference(q_ref, s_ref, dtype)), name


def test_entry_format_error_lives_in_errors() -> None:
    assert EntryFormatError is ErrorsEntryFormatError
    assert issubclass(EntryFormatError, StoreFormatError)


def test_int8_zero_tensor_round_trips() -> None:
    entry = KVEntry({"layer.k": torch.zeros(2, 4, 8), "layer.v": torch.zeros(2, 4, 8, dtype=torch.float16)})
    out = decode(encode(entry, namespace="n", key="k", codec="int8"))
    assert torch.equal(out.tensors["layer.k"], entry.tensors["layer.k"])
    assert torch.equal(out.tensors["layer.v"], entry.tensors["layer.v"])


def test_encode_rejects_caller_bugs() -> None:
    with pytest.raises(StoreError, match="unsupported dtype"):
        encode(KVEntry({"x": torch.zeros(2, dtype=torch.complex64)}), namespace="n", key="k")
    with pytest.raises(StoreError, match="msgpack"):
        encode(KVEntry({}, meta={"x": object()}), namespace="n", key="k")
    with pytest.raises(StoreError, match="msgpack"):
        encode(KVEntry({}, meta={1: "int keys do not read back"}), namespace="n", key="k")
    with pytest.raises(StoreError, match="codec"):
        encode(KVEntry({}), namespace="n", key="k", codec="fp4")


# -- malformed values: each one is an EntryFormatError of a precise kind ------------------------
@pytest.fixture
def blob() -> bytearray:
    return encode(kv_entry(fingerprint="model-a"), namespace="ns", key="key")


def test_flipped_payload_byte_is_corrupt(blob: bytearray) -> None:
    blob[-5] ^= 0x01
    assert _decode_kind(blob) == "corrupt"


def test_flipped_header_byte_is_corrupt(blob: bytearray) -> None:
    _, header, _ = split(blob)
    i = bytes(blob).index(b"model-a")
    blob[i] ^= 0x20  # still valid msgpack, still a str: only the checksum can tell
    assert _decode_kind(blob) == "corrupt"
    assert header["fingerprint"] == "model-a"


@pytest.mark.parametrize("keep", [0, 3, 20, 50, -1])
def test_truncated_value(blob: bytearray, keep: int) -> None:
    assert _decode_kind(blob[:keep]) == "truncated"


def test_truncated_mid_payload(blob: bytearray) -> None:
    assert _decode_kind(blob[: len(blob) // 2 + 100]) == "truncated"


def test_trailing_garbage_is_corrupt(blob: bytearray) -> None:
    assert _decode_kind(blob + b"\0" * 8) == "corrupt"


def test_other_version_is_rejected(blob: bytearray) -> None:
    version, header, payload = split(blob)
    assert version == FORMAT_VERSION
    assert _decode_kind(frame(header, payload, version=FORMAT_VERSION + 1)) == "version"


def test_wrong_fingerprint(blob: bytearray) -> None:
    assert decode(bytes(blob), fingerprint="model-a").fingerprint == "model-a"
    assert _decode_kind(blob, fingerprint="model-b") == "fingerprint_mismatch"
    assert _decode_kind(blob, fingerprint="") == "fingerprint_mismatch"


def test_value_copied_to_another_key_or_namespace(blob: bytearray) -> None:
    assert _decode_kind(blob, namespace="other", key="key") == "key_mismatch"
    assert _decode_kind(blob, namespace="ns", key="other") == "key_mismatch"


@pytest.mark.parametrize(
    "shape",
    [[2, 2, 8, 15], [2, 2, 8, 17], [-2, -2, 8, 16], [2**62, 2**62, 1, 1], [1] * (MAX_NDIM + 1), "abc", [2.0, 2, 8, 16]],
)
def test_header_shape_inconsistent_with_bytes(blob: bytearray, shape: object) -> None:
    _, header, payload = split(blob)
    header["tensors"][0]["shape"] = shape  # re-framed: the checksum is valid, the shape is not
    assert _decode_kind(frame(header, payload)) == "shape"


def test_declared_size_over_the_limit_is_oversize(blob: bytearray) -> None:
    _, header, payload = split(blob)
    spec = header["tensors"][0]
    spec["shape"], spec["nbytes"] = [1 << 20, 1 << 20], 1 << 41  # 2 TiB, claimed in a 1 KiB value
    assert _decode_kind(frame(header, payload)) == "oversize"
    assert _decode_kind(blob, max_entry_bytes=len(blob) - 1) == "oversize"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h["tensors"][0].update(dtype="complex64"),
        lambda h: h["tensors"][0].update(dtype="object"),
        lambda h: h["tensors"][0].update(codec="pickle"),
        lambda h: h["tensors"][0].update(offset=8),
        lambda h: h["tensors"][0].update(nbytes=-1),
        lambda h: h["tensors"][1].update(name="k"),
        lambda h: h.pop("tensors"),
        lambda h: h.update(meta=[1]),
    ],
)
def test_malformed_header_fields_are_corrupt(blob: bytearray, mutate) -> None:
    _, header, payload = split(blob)
    mutate(header)
    assert _decode_kind(frame(header, payload)) == "corrupt"


def test_not_a_kvcomm_value() -> None:
    assert _decode_kind(b"\x80\x04pickle-or-anything-else" * 4) == "corrupt"
    assert _decode_kind(b"KVCM" + b"\xff" * 60) in ("corrupt", "truncated")


def test_random_and_mutated_values_never_crash(blob: bytearray) -> None:
    rng = random.Random(0)
    raw = bytes(blob)
    for i in range(400):
        data = bytearray(raw)
        if i % 4 == 0:
            data = bytearray(rng.randbytes(rng.randrange(0, 200)))
        else:
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if i % 3 == 0:
                data = data[: rng.randrange(len(data))]
        try:
            decode(bytes(data), max_entry_bytes=1 << 16)
        except EntryFormatError:
            continue
        # the only accepted mutation is none at all (a byte overwritten with its own value)
        assert bytes(data) == raw
