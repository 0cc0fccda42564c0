"""Encode a KVEntry into one stored value, and decode (validating first) a value into a KVEntry.

A value is a fixed prefix, a msgpack header and the raw tensor bytes; its parts live beside this
module, which puts them together:

- :mod:`kvcomm.store.framing`: the byte layout (prefix, header, aligned payload), :func:`frame`
  and :func:`split` for tools and tests that craft or inspect values;
- :mod:`kvcomm.store.integrity`: the checksum (BLAKE3-256 or SHA-256) and, with a secret, the
  HMAC-SHA256 that binds a value to its namespace and key;
- :mod:`kvcomm.store.tensor_specs`: the header's ``tensors`` list, its dtypes and validation;
- :mod:`kvcomm.store.int8_codec`: the ``int8`` codec's quantization (``raw`` is bit exact).

Every name they export that callers used from here is still importable from here.

Decoding never unpickles or evaluates anything, and validates before it allocates, in this order:
the value size against ``max_entry_bytes``; the prefix (magic, flags, version, header length
against ``MAX_HEADER_BYTES`` and the value); with a secret, checksum then MAC, *before* the header
is parsed (unauthenticated bytes never reach msgpack); the header with msgpack's container limits;
every tensor spec (dtype and codec whitelists, non-negative dims each under the limit, byte counts
that match, parts in order, a total under ``max_entry_bytes``); the exact payload length; without
a secret, the checksum; then namespace, key and fingerprint. Only then are tensors allocated, each
at most its validated size (int8 parts decode to at most 2 bytes per stored byte for fp16/bf16
and 4 for fp32). Any failure raises :class:`EntryFormatError` whose ``kind`` is a fault kind.
"""

from __future__ import annotations

import hmac
import warnings
from typing import Any, cast

import msgpack
import torch

from kvcomm.errors import EntryFormatError, StoreError
from kvcomm.store.entry import KVEntry
from kvcomm.store.framing import (
    ALIGN,
    FORMAT_VERSION,
    MAGIC,
    MAX_CONTAINER_LEN,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    PREFIX_BYTES,
    align,
    assemble,
    frame,
    is_signed,
    read_prefix,
    split,
    unpack_header,
)
from kvcomm.store.int8_codec import dequantize, int8_kind, quantize
from kvcomm.store.integrity import (
    DEFAULT_DIGEST,
    DIGESTS,
    FLAG_BLAKE3,
    FLAG_SIGNED,
    MAC_BYTES,
    check_digest,
    checksum,
    entry_mac,
)
from kvcomm.store.tensor_specs import DTYPE_NAMES, DTYPES, MAX_DIM, MAX_NDIM, check_specs

CODECS = ("raw", "int8")
DEFAULT_MAX_ENTRY_BYTES = 512 << 20  # Redis' own default proto-max-bulk-len


# -- encode --------------------------------------------------------------------------------------
def encode(
    entry: KVEntry,
    *,
    namespace: str,
    key: str,
    codec: str = "raw",
    version: int = FORMAT_VERSION,
    secret: bytes | None = None,
    digest: str = DEFAULT_DIGEST,
) -> bytearray:
    """Serialize ``entry`` (tensors on any device) into one value, signed if ``secret`` is given.

    ``namespace`` and ``key`` are written into the header and, with a ``secret``, into the MAC.
    ``digest`` is the checksum algorithm (``"blake3"``, the default where installed, or ``"sha256"``).

    Raises:
        StoreError: unknown codec, unsupported dtype, non-str tensor name or meta that msgpack
            cannot round-trip (caller bugs).
    """
    check_digest(digest)
    if codec not in CODECS:
        raise StoreError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
    if len(entry.tensors) > MAX_TENSORS:
        raise StoreError(f"an entry holds at most {MAX_TENSORS} tensors, got {len(entry.tensors)}")
    specs: list[dict[str, Any]] = []
    parts: list[tuple[int, torch.Tensor]] = []
    cursor = 0

    def add(t: torch.Tensor) -> tuple[int, int]:
        nonlocal cursor
        offset = align(cursor)
        nbytes = t.numel() * t.element_size()
        parts.append((offset, t))
        cursor = offset + nbytes
        return offset, nbytes

    for name, t in entry.tensors.items():
        if not isinstance(name, str) or not name:
            raise StoreError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise StoreError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise StoreError(f"tensor {name!r} has unsupported dtype {t.dtype}: use one of {', '.join(DTYPES)}")
        t = t.detach()
        kind = int8_kind(name, t) if codec == "int8" else None
        spec: dict[str, Any] = {"name": name, "dtype": dtype, "shape": list(t.shape), "codec": "raw", "scale": None}
        if kind is None:
            spec["offset"], spec["nbytes"] = add(t)
        else:
            q, scale = quantize(t, kind)
            spec["codec"] = "int8"
            spec["offset"], spec["nbytes"] = add(q.to(torch.int8))
            scale = scale.to(torch.float32)
            s_off, s_nbytes = add(scale)
            spec["scale"] = {"shape": list(scale.shape), "offset": s_off, "nbytes": s_nbytes}
        specs.append(spec)

    header = {
        "fingerprint": entry.fingerprint,
        "namespace": namespace,
        "key": key,
        "meta": entry.meta,
        "tensors": specs,
    }
    try:
        packed = msgpack.packb(header, use_bin_type=True)
        unpack_header(packed)  # what cannot be read back must not be written
    except (TypeError, ValueError, OverflowError, EntryFormatError) as exc:
        raise StoreError(f"entry meta/fingerprint cannot be stored as msgpack: {exc}") from exc
    return assemble(version, packed, parts, cursor, (secret, namespace, key) if secret else None, digest)


# -- decode --------------------------------------------------------------------------------------
def decode(
    blob: bytes | bytearray | memoryview | torch.Tensor,
    *,
    namespace: str | None = None,
    key: str | None = None,
    fingerprint: str | None = None,
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    device: str | torch.device = "cpu",
    secret: bytes | None = None,
    owned: bool = False,
) -> KVEntry:
    """Validate and deserialize one value into a KVEntry whose tensors live on ``device``.

    With ``owned=True`` the caller hands ``blob`` over (a writable buffer nobody else reuses): the
    tensors of a raw entry decoded on the CPU are views of it instead of copies, and copies to a
    CUDA device are issued without waiting. ``blob`` may be a 1-D uint8 CPU tensor (pinned memory
    for a CUDA ``device``: the copies are then asynchronous and torch keeps the pinned block alive
    until they are done).

    Args:
        namespace, key: if given, the header must name exactly these (else ``key_mismatch``);
            required with a ``secret``: the MAC is checked against them.
        fingerprint: if given, the stored fingerprint must equal it (else ``fingerprint_mismatch``).
        max_entry_bytes: values or declared payloads larger than this are ``oversize``.
        secret: the HMAC key; if given, only entries signed with it for this namespace and key
            are accepted (else ``unsigned`` or ``bad_mac``).

    Raises:
        EntryFormatError: with ``kind`` in corrupt, truncated, version, shape, oversize, unsigned,
            bad_mac, key_mismatch, fingerprint_mismatch.
        StoreError: a ``secret`` without ``namespace`` and ``key`` (a caller bug).
    """
    if len(blob) > max_entry_bytes:
        raise EntryFormatError("oversize", f"value of {len(blob)} bytes is over the {max_entry_bytes}-byte limit")
    source = blob if isinstance(blob, torch.Tensor) else None
    view = memoryview(cast(Any, source.numpy())) if source is not None else memoryview(cast(Any, blob))
    version, flags, header_off, header_len, stored_digest = read_prefix(view)
    if version != FORMAT_VERSION:
        raise EntryFormatError("version", f"format version {version}, this kvcomm reads version {FORMAT_VERSION}")
    if secret is not None:  # authenticate before parsing: forged headers never reach msgpack
        if namespace is None or key is None:
            raise StoreError("decode(secret=...) needs the namespace and key the entry is read under")
        if not flags & FLAG_SIGNED:
            raise EntryFormatError("unsigned", "entry is not signed, and this store only accepts signed entries")
        digest = checksum(view, header_off, flags)
        if not hmac.compare_digest(stored_digest, digest):
            raise EntryFormatError("corrupt", "checksum mismatch")
        if not hmac.compare_digest(bytes(view[PREFIX_BYTES:header_off]), entry_mac(secret, namespace, key, digest, flags)):
            raise EntryFormatError("bad_mac", "MAC mismatch: written without this store's secret, or under another "
                                              "namespace or key")
    header = unpack_header(view[header_off : header_off + header_len])
    payload_off = min(align(header_off + header_len), len(view))
    payload = view[payload_off:]
    expected = check_specs(header["tensors"], max_entry_bytes)
    if len(payload) < expected:
        raise EntryFormatError("truncated", f"payload has {len(payload)} of {expected} bytes")
    if len(payload) > expected:
        raise EntryFormatError("corrupt", f"payload has {len(payload)} bytes, the header describes {expected}")
    if secret is None and not hmac.compare_digest(stored_digest, checksum(view, header_off, flags)):
        raise EntryFormatError("corrupt", "checksum mismatch")
    for field, want in (("namespace", namespace), ("key", key)):
        if want is not None and header[field] != want:
            raise EntryFormatError("key_mismatch", f"entry was written for {field} {header[field]!r}, read as {want!r}")
    if fingerprint is not None and header["fingerprint"] != fingerprint:
        raise EntryFormatError(
            "fingerprint_mismatch", f"entry fingerprint {header['fingerprint']!r} != expected {fingerprint!r}"
        )
    src = source[payload_off:] if source is not None else _uint8_view(payload)
    return KVEntry(tensors=_materialize(src, header["tensors"], device, owned), meta=header["meta"],
                   fingerprint=header["fingerprint"])


def _materialize(src: torch.Tensor, specs: list[dict[str, Any]], device: str | torch.device,
                 owned: bool) -> dict[str, torch.Tensor]:
    device = torch.device(device)

    def part(spec: dict[str, Any], dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        if spec["nbytes"] == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        t = src[spec["offset"] : spec["offset"] + spec["nbytes"]].view(dtype).reshape(shape)
        # on the CPU still a view of the value: callers clone or transform (or own the value)
        return t.to(device, non_blocking=owned)

    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        dtype = DTYPES[spec["dtype"]]
        if spec["codec"] == "raw":
            t = part(spec, dtype, spec["shape"])
            copy = t.device.type == "cpu" and spec["nbytes"] and not owned
            out[spec["name"]] = t.clone() if copy else t
        else:
            q = part(spec, torch.int8, spec["shape"])
            scale = part(spec["scale"], torch.float32, spec["scale"]["shape"])
            out[spec["name"]] = dequantize(q, scale, dtype)
    return out


def _uint8_view(payload: memoryview) -> torch.Tensor:
    if not len(payload):
        return torch.empty(0, dtype=torch.uint8)
    if payload.readonly:  # bytes from redis-py: torch warns once that it cannot protect them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(payload, dtype=torch.uint8)
    return torch.frombuffer(payload, dtype=torch.uint8)


__all__ = [
    "ALIGN",
    "CODECS",
    "DEFAULT_DIGEST",
    "DEFAULT_MAX_ENTRY_BYTES",
    "DIGESTS",
    "DTYPES",
    "FLAG_BLAKE3",
    "FLAG_SIGNED",
    "FORMAT_VERSION",
    "MAC_BYTES",
    "MAGIC",
    "MAX_CONTAINER_LEN",
    "MAX_DIM",
    "MAX_HEADER_BYTES",
    "MAX_NDIM",
    "MAX_TENSORS",
    "PREFIX_BYTES",
    "decode",
    "encode",
    "frame",
    "is_signed",
    "split",
]
