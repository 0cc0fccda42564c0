"""The frame of one stored value: a fixed prefix, a msgpack header, aligned raw payload bytes.

Layout (little endian)::

    offset 0   magic  b"KVCM"
           4   u16    format version
           6   u16    flags: bit 0 = signed (a MAC follows the prefix); bit 1 = the checksum is
                      BLAKE3-256 (else SHA-256); other bits must be 0
           8   u32    header length H
          12   32 B   checksum over bytes [4, 12) and [B, end): version, flags, H, header,
                      padding and payload, so any flipped byte is detected
          44   32 B   signed entries only: MAC (see :mod:`kvcomm.store.integrity`)
           B   H B    msgpack map: fingerprint, namespace, key, meta, tensors
                      (:mod:`kvcomm.store.tensor_specs`); B = 44, or 76 for a signed entry
               pad    zeros up to a multiple of 64
               payload: each tensor part at a 64-aligned offset (relative to the payload start)

This module writes and reads that frame (prefix bounds, header container limits, the required
header fields); what the tensors in it mean is :mod:`kvcomm.store.codec`'s.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import torch

from kvcomm.errors import EntryFormatError, StoreError
from kvcomm.store.integrity import (
    DEFAULT_DIGEST,
    FLAG_BLAKE3,
    FLAG_SIGNED,
    MAC_BYTES,
    check_digest,
    checksum,
    entry_mac,
)

MAGIC = b"KVCM"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 4 << 20
MAX_TENSORS = 4096
MAX_CONTAINER_LEN = 1 << 16  # msgpack arrays/maps in a header
ALIGN = 64

_PREFIX = struct.Struct("<4sHHI32s")
PREFIX_BYTES = _PREFIX.size  # 44


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# -- write -----------------------------------------------------------------------------------------
def frame(
    header: dict[str, Any],
    payload: bytes | memoryview,
    *,
    version: int = FORMAT_VERSION,
    secret: bytes | None = None,
    namespace: str | None = None,
    key: str | None = None,
    digest: str = DEFAULT_DIGEST,
) -> bytearray:
    """Wrap an already-built header and payload with a valid prefix and checksum (and MAC).

    Low level (tools and tests that craft entries); :func:`kvcomm.store.codec.encode` is the
    normal way in. The MAC binds ``namespace``/``key``, by default the header's own.
    """
    check_digest(digest)
    packed = msgpack.packb(header, use_bin_type=True)
    payload_t = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) else torch.empty(0)
    signer = (secret, namespace or header["namespace"], key or header["key"]) if secret else None
    return assemble(version, packed, [(0, payload_t)], len(payload), signer, digest)


def assemble(
    version: int,
    packed: bytes,
    parts: list[tuple[int, torch.Tensor]],
    payload_len: int,
    signer: tuple[bytes, str, str] | None,
    digest_name: str,
) -> bytearray:
    """One value: the prefix, ``packed`` (the header), and each ``(offset, tensor)`` part's bytes
    at its payload offset; signed with ``signer = (secret, namespace, key)`` if given."""
    if len(packed) > MAX_HEADER_BYTES:
        raise StoreError(f"entry header is {len(packed)} bytes, over the {MAX_HEADER_BYTES} limit")
    flags = (FLAG_SIGNED if signer else 0) | (FLAG_BLAKE3 if digest_name == "blake3" else 0)
    header_off = PREFIX_BYTES + (MAC_BYTES if signer else 0)
    payload_off = align(header_off + len(packed))
    buf = bytearray(payload_off + payload_len)
    buf[header_off : header_off + len(packed)] = packed
    for offset, t in parts:
        n = t.numel() * t.element_size()
        if n:
            dst = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=payload_off + offset)
            dst.copy_(t.contiguous().reshape(-1).view(torch.uint8))
    struct.pack_into("<HHI", buf, 4, version, flags, len(packed))
    digest = checksum(buf, header_off, flags)
    _PREFIX.pack_into(buf, 0, MAGIC, version, flags, len(packed), digest)
    if signer:
        buf[PREFIX_BYTES:header_off] = entry_mac(*signer, digest, flags)
    return buf


# -- read ------------------------------------------------------------------------------------------
def is_signed(blob: bytes | bytearray | memoryview) -> bool:
    """Whether a value carries the signed flag (its first 8 bytes suffice; nothing is verified)."""
    return len(blob) >= 8 and bytes(blob[:4]) == MAGIC and bool(struct.unpack_from("<H", blob, 6)[0] & FLAG_SIGNED)


def split(blob: bytes | bytearray | memoryview) -> tuple[int, dict[str, Any], memoryview]:
    """Parse the framing only: ``(version, header, payload)``; no checksum or shape checks.

    Raises:
        EntryFormatError: not a kvcomm value, truncated prefix or header, undecodable header.
    """
    view = memoryview(blob)
    version, _flags, header_off, header_len, _ = read_prefix(view)
    header = unpack_header(view[header_off : header_off + header_len])
    payload_off = min(align(header_off + header_len), len(view))
    return version, header, view[payload_off:]


def read_prefix(view: memoryview) -> tuple[int, int, int, int, bytes]:
    """``(version, flags, header offset, header length, checksum)`` after bounds checks (no allocation)."""
    if len(view) < PREFIX_BYTES:
        kind = "truncated" if MAGIC.startswith(bytes(view[:4])) else "corrupt"
        raise EntryFormatError(kind, f"value of {len(view)} bytes is shorter than the {PREFIX_BYTES}-byte prefix")
    magic, version, flags, header_len, digest = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise EntryFormatError("corrupt", f"bad magic {bytes(magic)!r}: not a kvcomm entry")
    if flags & ~(FLAG_SIGNED | FLAG_BLAKE3):
        raise EntryFormatError("corrupt", f"unknown flags {flags:#06x}")
    if header_len > MAX_HEADER_BYTES:
        raise EntryFormatError("corrupt", f"header length {header_len} is over the {MAX_HEADER_BYTES} limit")
    header_off = PREFIX_BYTES + (MAC_BYTES if flags & FLAG_SIGNED else 0)
    if header_off + header_len > len(view):
        raise EntryFormatError("truncated", f"header of {header_len} bytes runs past the {len(view)}-byte value")
    return version, flags, header_off, header_len, digest


def unpack_header(raw: bytes | memoryview) -> dict[str, Any]:
    """The header map, with msgpack's container limits and the required fields' types checked."""
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True, max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN, max_ext_len=0,  # no ext types: nothing but plain data
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise EntryFormatError("corrupt", f"undecodable header: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise EntryFormatError("corrupt", "header is not a map")
    for name, typ in (("fingerprint", str), ("namespace", str), ("key", str), ("meta", dict), ("tensors", list)):
        if not isinstance(header.get(name), typ):
            raise EntryFormatError("corrupt", f"header field {name!r} is missing or not a {typ.__name__}")
    if len(header["tensors"]) > MAX_TENSORS:
        raise EntryFormatError("corrupt", f"header lists {len(header['tensors'])} tensors (max {MAX_TENSORS})")
    return header


__all__ = [
    "ALIGN",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CONTAINER_LEN",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "PREFIX_BYTES",
    "align",
    "assemble",
    "frame",
    "is_signed",
    "read_prefix",
    "split",
    "unpack_header",
]
