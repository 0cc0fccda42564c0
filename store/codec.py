"""The stored byte format of one KVEntry: a fixed prefix, a msgpack header, raw tensor bytes.

Layout (little endian)::

    offset 0   magic  b"KVCM"
           4   u16    format version
           6   u16    flags: bit 0 = signed (a MAC follows the prefix); bit 1 = the checksum is
                      BLAKE3-256 (else SHA-256); other bits must be 0
           8   u32    header length H
          12   32 B   checksum over bytes [4, 12) and [B, end): version, flags, H, header,
                      padding and payload, so any flipped byte is detected
          44   32 B   signed entries only: MAC (see below)
           B   H B    msgpack map: fingerprint, namespace, key, meta, tensors (see below);
                      B = 44, or 76 for a signed entry
               pad    zeros up to a multiple of 64
               payload: each tensor part at a 64-aligned offset (relative to the payload start)

Each ``tensors`` item: ``{name, dtype, shape, codec, offset, nbytes, scale}``. ``dtype`` and
``shape`` are the logical (decoded) ones. ``codec == "raw"``: ``nbytes`` bytes of ``dtype``.
``codec == "int8"``: ``nbytes`` int8 values of ``shape`` then ``scale = {shape, offset, nbytes}``
float32 scales of shape ``[..., 1, D]`` (keys) or ``[..., T, 1]`` (values); value = q * scale.

Integrity. The checksum is BLAKE3-256 where the ``blake3`` package is installed (a dependency of
kvcomm; about 3x faster than SHA-256 on one core, which bounds how fast a large entry can be read)
and SHA-256 otherwise; readers accept both (flag bit 1 says which). Unsigned entries carry only the
checksum: it catches accidental corruption, not an attacker, who can recompute it. With a shared
secret (``secret=`` or ``$KVCOMM_STORE_KEY``) an entry is signed: ``MAC = HMAC-SHA256(secret,
domain | len+namespace | len+key | checksum)``, the domain ``b"kvcomm-entry-mac/1"`` (SHA-256) or
``b"kvcomm-entry-mac/1+blake3"``. Both checksums are collision resistant and cover the flags, header
and payload, so the MAC authenticates every byte of the value *and* the namespace and key it is
stored under: a value copied to another key or namespace, or written without the secret, fails. A reader with a secret rejects unsigned entries
(``unsigned``) and bad MACs (``bad_mac``); a reader without one still checks the checksum of
signed entries. The MAC does not encrypt: whoever can read the Redis can read the KV.

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

import hashlib
import hmac
import math
import struct
import warnings
from typing import Any, cast

import msgpack
import torch

from kvcomm.errors import EntryFormatError, StoreError
from kvcomm.store.entry import KVEntry

_blake3: Any
try:  # the fast checksum; without it entries are written with SHA-256 and BLAKE3 ones are misses
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; this is the fallback
    _blake3 = None

MAGIC = b"KVCM"
FORMAT_VERSION = 1
CODECS = ("raw", "int8")
DEFAULT_MAX_ENTRY_BYTES = 512 << 20  # Redis' own default proto-max-bulk-len
MAX_HEADER_BYTES = 4 << 20
MAX_TENSORS = 4096
MAX_NDIM = 8
MAX_DIM = (1 << 31) - 1  # per dimension; byte counts bound the product
MAX_CONTAINER_LEN = 1 << 16  # msgpack arrays/maps in a header
ALIGN = 64
FLAG_SIGNED = 1
FLAG_BLAKE3 = 2
MAC_BYTES = 32
_MAC_DOMAIN = b"kvcomm-entry-mac/1"
#: checksum algorithms; entries are written with DEFAULT_DIGEST, read with either
DIGESTS = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3" if _blake3 is not None else "sha256"

_PREFIX = struct.Struct("<4sHHI32s")
PREFIX_BYTES = _PREFIX.size  # 44

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}
_INT8_FLOATS = ("float32", "float16", "bfloat16")  # what the int8 kernels take


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# -- int8 ------------------------------------------------------------------------------------------
# The one int8 reference is kvcomm.kernels.quant (its Triton kernel on CUDA, its torch reference
# elsewhere). Imported on first use: importing the kernels imports Triton, which a store that
# never quantizes does not need.
def _quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    from kvcomm.kernels.quant import quantize_kv

    return quantize_kv(x, kind)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from kvcomm.kernels.quant import dequantize_kv

    return dequantize_kv(q, scale, dtype)


def _int8_kind(name: str, t: torch.Tensor) -> str | None:
    kind = name.rsplit(".", 1)[-1]
    if kind in ("k", "v") and _DTYPE_NAMES.get(t.dtype) in _INT8_FLOATS and t.dim() >= 2 and t.numel() > 0:
        return kind
    return None


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
    _check_digest(digest)
    if codec not in CODECS:
        raise StoreError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
    if len(entry.tensors) > MAX_TENSORS:
        raise StoreError(f"an entry holds at most {MAX_TENSORS} tensors, got {len(entry.tensors)}")
    specs: list[dict[str, Any]] = []
    parts: list[tuple[int, torch.Tensor]] = []
    cursor = 0

    def add(t: torch.Tensor) -> tuple[int, int]:
        nonlocal cursor
        offset = _align(cursor)
        nbytes = t.numel() * t.element_size()
        parts.append((offset, t))
        cursor = offset + nbytes
        return offset, nbytes

    for name, t in entry.tensors.items():
        if not isinstance(name, str) or not name:
            raise StoreError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise StoreError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise StoreError(f"tensor {name!r} has unsupported dtype {t.dtype}: use one of {', '.join(DTYPES)}")
        t = t.detach()
        kind = _int8_kind(name, t) if codec == "int8" else None
        spec: dict[str, Any] = {"name": name, "dtype": dtype, "shape": list(t.shape), "codec": "raw", "scale": None}
        if kind is None:
            spec["offset"], spec["nbytes"] = add(t)
        else:
            q, scale = _quantize(t, kind)
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
        _unpack_header(packed)  # what cannot be read back must not be written
    except (TypeError, ValueError, OverflowError, EntryFormatError) as exc:
        raise StoreError(f"entry meta/fingerprint cannot be stored as msgpack: {exc}") from exc
    return _assemble(version, packed, parts, cursor, (secret, namespace, key) if secret else None, digest)


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

    Low level (tools and tests that craft entries); :func:`encode` is the normal way in. The MAC
    binds ``namespace``/``key``, by default the header's own.
    """
    _check_digest(digest)
    packed = msgpack.packb(header, use_bin_type=True)
    payload_t = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) else torch.empty(0)
    signer = (secret, namespace or header["namespace"], key or header["key"]) if secret else None
    return _assemble(version, packed, [(0, payload_t)], len(payload), signer, digest)


def _check_digest(digest: str) -> None:
    if digest not in DIGESTS:
        raise StoreError(f"unknown checksum {digest!r}: use one of {', '.join(DIGESTS)}")
    if digest == "blake3" and _blake3 is None:
        raise StoreError("the blake3 checksum needs the blake3 package (pip install blake3), or use digest='sha256'")


def _assemble(
    version: int,
    packed: bytes,
    parts: list[tuple[int, torch.Tensor]],
    payload_len: int,
    signer: tuple[bytes, str, str] | None,
    digest_name: str,
) -> bytearray:
    if len(packed) > MAX_HEADER_BYTES:
        raise StoreError(f"entry header is {len(packed)} bytes, over the {MAX_HEADER_BYTES} limit")
    flags = (FLAG_SIGNED if signer else 0) | (FLAG_BLAKE3 if digest_name == "blake3" else 0)
    header_off = PREFIX_BYTES + (MAC_BYTES if signer else 0)
    payload_off = _align(header_off + len(packed))
    buf = bytearray(payload_off + payload_len)
    buf[header_off : header_off + len(packed)] = packed
    for offset, t in parts:
        n = t.numel() * t.element_size()
        if n:
            dst = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=payload_off + offset)
            dst.copy_(t.contiguous().reshape(-1).view(torch.uint8))
    struct.pack_into("<HHI", buf, 4, version, flags, len(packed))
    digest = _digest(buf, header_off, flags)
    _PREFIX.pack_into(buf, 0, MAGIC, version, flags, len(packed), digest)
    if signer:
        buf[PREFIX_BYTES:header_off] = _mac(*signer, digest, flags)
    return buf


def _digest(buf: bytes | bytearray | memoryview, header_off: int, flags: int) -> bytes:
    view = memoryview(buf)
    if flags & FLAG_BLAKE3:
        if _blake3 is None:
            raise EntryFormatError("version", "the entry's checksum is BLAKE3 and the blake3 package is not installed")
        h: Any = _blake3.blake3(view[4:12])
    else:
        h = hashlib.sha256(view[4:12])
    h.update(view[header_off:])  # both release the GIL on large buffers
    return bytes(h.digest())


def _mac(secret: bytes, namespace: str, key: str, digest: bytes, flags: int) -> bytes:
    """HMAC-SHA256 of the checksum, bound to the namespace and key (length-prefixed: unambiguous)."""
    ns, k = namespace.encode("utf-8"), key.encode("utf-8")
    domain = _MAC_DOMAIN + (b"+blake3" if flags & FLAG_BLAKE3 else b"")
    msg = b"".join((domain, struct.pack("<I", len(ns)), ns, struct.pack("<I", len(k)), k, digest))
    return hmac.new(secret, msg, hashlib.sha256).digest()


def is_signed(blob: bytes | bytearray | memoryview) -> bool:
    """Whether a value carries the signed flag (its first 8 bytes suffice; nothing is verified)."""
    return len(blob) >= 8 and bytes(blob[:4]) == MAGIC and bool(struct.unpack_from("<H", blob, 6)[0] & FLAG_SIGNED)


# -- decode --------------------------------------------------------------------------------------
def split(blob: bytes | bytearray | memoryview) -> tuple[int, dict[str, Any], memoryview]:
    """Parse the framing only: ``(version, header, payload)``; no checksum or shape checks.

    Raises:
        EntryFormatError: not a kvcomm value, truncated prefix or header, undecodable header.
    """
    view = memoryview(blob)
    version, _flags, header_off, header_len, _ = _prefix(view)
    header = _unpack_header(view[header_off : header_off + header_len])
    payload_off = min(_align(header_off + header_len), len(view))
    return version, header, view[payload_off:]


def _prefix(view: memoryview) -> tuple[int, int, int, int, bytes]:
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


def _unpack_header(raw: bytes | memoryview) -> dict[str, Any]:
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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_part(where: str, shape: Any, itemsize: int, part: dict[str, Any], cursor: int, limit: int) -> int:
    """Validate one byte range; returns the new cursor (end of the part)."""
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise EntryFormatError("shape", f"{where}: shape {shape!r} is not a list of at most {MAX_NDIM} ints in [0, {MAX_DIM}]")
    offset: Any = part.get("offset")
    nbytes: Any = part.get("nbytes")
    if not (_is_int(offset) and _is_int(nbytes)) or nbytes < 0:
        raise EntryFormatError("corrupt", f"{where}: offset/nbytes {offset!r}/{nbytes!r} are not non-negative ints")
    if offset != _align(cursor):
        raise EntryFormatError("corrupt", f"{where}: offset {offset} is not the next aligned offset {_align(cursor)}")
    if offset + nbytes > limit:
        raise EntryFormatError("oversize", f"{where}: ends at byte {offset + nbytes}, over the {limit}-byte limit")
    if math.prod(shape) * itemsize != nbytes:  # Python ints: no overflow on absurd shapes
        raise EntryFormatError("shape", f"{where}: shape {shape} x {itemsize} B does not match nbytes {nbytes}")
    return int(offset + nbytes)


def _check_specs(specs: list[Any], limit: int) -> int:
    """Validate every tensor spec; returns the payload length they describe."""
    cursor, names = 0, set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or spec["name"] in names:
            raise EntryFormatError("corrupt", f"tensor #{i}: missing or duplicate name")
        name = spec["name"]
        names.add(name)
        dtype, codec = spec.get("dtype"), spec.get("codec")
        if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or map is unhashable
            raise EntryFormatError("corrupt", f"tensor {name!r}: dtype {dtype!r} is not allowed")
        if codec == "raw":
            cursor = _check_part(f"tensor {name!r}", spec.get("shape"), _ITEMSIZE[dtype], spec, cursor, limit)
        elif codec == "int8":
            if dtype not in _INT8_FLOATS or not isinstance(spec.get("scale"), dict):
                raise EntryFormatError("corrupt", f"tensor {name!r}: int8 needs a float16/32 dtype and a scale")
            shape: Any = spec.get("shape")
            scale: dict[str, Any] = spec["scale"]
            cursor = _check_part(f"tensor {name!r}", shape, 1, spec, cursor, limit)
            cursor = _check_part(f"scale of {name!r}", scale.get("shape"), 4, scale, cursor, limit)
            s_shape = scale["shape"]
            if len(shape) < 2 or s_shape not in ([*shape[:-2], 1, shape[-1]], [*shape[:-1], 1]):
                raise EntryFormatError("shape", f"tensor {name!r}: int8 shape {shape} with scale shape {s_shape}: "
                                                "want [..., T, D] with [..., 1, D] or [..., T, 1]")
        else:
            raise EntryFormatError("corrupt", f"tensor {name!r}: unknown codec {codec!r}")
    return cursor


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
    version, flags, header_off, header_len, stored_digest = _prefix(view)
    if version != FORMAT_VERSION:
        raise EntryFormatError("version", f"format version {version}, this kvcomm reads version {FORMAT_VERSION}")
    if secret is not None:  # authenticate before parsing: forged headers never reach msgpack
        if namespace is None or key is None:
            raise StoreError("decode(secret=...) needs the namespace and key the entry is read under")
        if not flags & FLAG_SIGNED:
            raise EntryFormatError("unsigned", "entry is not signed, and this store only accepts signed entries")
        digest = _digest(view, header_off, flags)
        if not hmac.compare_digest(stored_digest, digest):
            raise EntryFormatError("corrupt", "checksum mismatch")
        if not hmac.compare_digest(bytes(view[PREFIX_BYTES:header_off]), _mac(secret, namespace, key, digest, flags)):
            raise EntryFormatError("bad_mac", "MAC mismatch: written without this store's secret, or under another "
                                              "namespace or key")
    header = _unpack_header(view[header_off : header_off + header_len])
    payload_off = min(_align(header_off + header_len), len(view))
    payload = view[payload_off:]
    expected = _check_specs(header["tensors"], max_entry_bytes)
    if len(payload) < expected:
        raise EntryFormatError("truncated", f"payload has {len(payload)} of {expected} bytes")
    if len(payload) > expected:
        raise EntryFormatError("corrupt", f"payload has {len(payload)} bytes, the header describes {expected}")
    if secret is None and not hmac.compare_digest(stored_digest, _digest(view, header_off, flags)):
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
            out[spec["name"]] = _dequantize(q, scale, dtype)
    return out


def _uint8_view(payload: memoryview) -> torch.Tensor:
    if not len(payload):
        return torch.empty(0, dtype=torch.uint8)
    if payload.readonly:  # bytes from redis-py: torch warns once that it cannot protect them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(payload, dtype=torch.uint8)
    return torch.frombuffer(payload, dtype=torch.uint8)
