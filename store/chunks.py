"""Entries larger than one value: chunk keys plus a manifest under the entry's own key.

An encoded entry (:mod:`kvcomm.store.codec`) longer than a store's ``chunk_bytes`` is cut into
byte ranges of that size. Range ``i`` is stored under :class:`kvcomm.keys.ChunkKey` ``(key,
generation, i)``, and after every chunk is written, a small manifest is written under ``key``::

    offset 0  magic  b"KVCK"
           4  u16    manifest version (1)
           6  u16    0
           8  msgpack map: generation (hex), total (bytes of the entry), chunk (bytes per chunk),
                            count (chunks), head (the entry's first 8 bytes: magic, version, flags)

A reader that finds a manifest fetches every chunk (in one pipelined batch per shard), each
straight into its place in one buffer, and decodes the whole value as usual: the checksum and, on
a signed store, the MAC cover the entire entry, so a chunk that is missing, evicted, truncated,
longer, or swapped in from another entry or position makes the entry a miss, never a wrong tensor.
The generation (random per write) keeps the chunks of two writes of one key apart; a writer that
replaces a chunked entry unlinks the old generation's chunks after the new manifest is in place.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from kvcomm.errors import EntryFormatError
from kvcomm.keys import ChunkKey

MANIFEST_MAGIC = b"KVCK"
MANIFEST_VERSION = 1
#: every manifest is shorter than this (readers peek at this many bytes of a key)
MANIFEST_MAX_BYTES = 256
MAX_CHUNKS = 1 << 20
#: the smallest chunk size a store takes (and a manifest may name)
MIN_CHUNK_BYTES = 4096
_PREFIX = struct.Struct("<4sHH")


@dataclass(frozen=True)
class Manifest:
    """Where the chunks of one write of an entry are, and how long each is."""

    generation: str
    total: int
    chunk: int
    count: int
    head: bytes = b""

    def key(self, entry: str, index: int) -> str:
        """The relative key of chunk ``index``."""
        return str(ChunkKey(entry, self.generation, index))

    def keys(self, entry: str) -> list[str]:
        return [self.key(entry, i) for i in range(self.count)]

    def span(self, index: int) -> tuple[int, int]:
        """``(start, stop)`` of chunk ``index`` in the entry."""
        start = index * self.chunk
        return start, min(start + self.chunk, self.total)

    def encode(self) -> bytes:
        body = msgpack.packb({"generation": self.generation, "total": self.total, "chunk": self.chunk,
                              "count": self.count, "head": self.head}, use_bin_type=True)
        return _PREFIX.pack(MANIFEST_MAGIC, MANIFEST_VERSION, 0) + body


def plan(total: int, chunk: int, head: bytes) -> Manifest:
    """The manifest of a new write of ``total`` bytes in chunks of ``chunk`` (a fresh generation)."""
    return Manifest(secrets.token_hex(8), total, chunk, -(-total // chunk), bytes(head[:8]))


def is_manifest(value: bytes | bytearray | memoryview) -> bool:
    return bytes(value[:4]) == MANIFEST_MAGIC


def parse(value: bytes | bytearray | memoryview, *, max_total: int) -> Manifest:
    """The manifest in ``value``, validated (counts and sizes consistent, ``total <= max_total``).

    Raises:
        EntryFormatError: ``corrupt`` (undecodable or inconsistent), ``version``, ``oversize``.
    """
    if len(value) < _PREFIX.size or len(value) > MANIFEST_MAX_BYTES:
        raise EntryFormatError("corrupt", f"chunk manifest of {len(value)} bytes")
    magic, version, _ = _PREFIX.unpack_from(value, 0)
    if magic != MANIFEST_MAGIC:
        raise EntryFormatError("corrupt", "not a chunk manifest")
    if version != MANIFEST_VERSION:
        raise EntryFormatError("version", f"chunk manifest version {version}, this kvcomm reads {MANIFEST_VERSION}")
    try:
        body: Any = msgpack.unpackb(bytes(value[_PREFIX.size :]), raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise EntryFormatError("corrupt", f"undecodable chunk manifest: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise EntryFormatError("corrupt", "chunk manifest is not a map")
    gen, total, chunk, count, head = (cast(Any, body.get(k)) for k in ("generation", "total", "chunk", "count", "head"))
    if not (isinstance(gen, str) and isinstance(head, bytes) and _ints(total, chunk, count)):
        raise EntryFormatError("corrupt", "chunk manifest fields have the wrong types")
    total, chunk, count = int(total), int(chunk), int(count)
    if not (MIN_CHUNK_BYTES <= chunk and 0 < total and 0 < count <= MAX_CHUNKS and count == -(-total // chunk)):
        raise EntryFormatError("corrupt", f"chunk manifest: {count} chunks of {chunk} bytes cannot hold {total}")
    if total > max_total:
        raise EntryFormatError("oversize", f"chunked entry of {total} bytes is over the {max_total}-byte limit")
    try:
        ChunkKey("x", gen, count - 1)  # a generation that makes valid keys
    except Exception:  # noqa: BLE001 - KeyFormatError: the manifest is bad, not the caller
        raise EntryFormatError("corrupt", f"chunk manifest generation {gen[:80]!r}") from None
    return Manifest(gen, total, chunk, count, head)


def _ints(*values: Any) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) for x in values)


__all__ = ["MANIFEST_MAGIC", "MANIFEST_MAX_BYTES", "MIN_CHUNK_BYTES", "Manifest", "is_manifest", "parse", "plan"]
