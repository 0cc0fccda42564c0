"""The checksum and MAC of a stored entry, and the flag bits that say which ones it carries.

The checksum is BLAKE3-256 where the ``blake3`` package is installed (a dependency of kvcomm;
about 3x faster than SHA-256 on one core, which bounds how fast a large entry can be read) and
SHA-256 otherwise; readers accept both (flag bit 1 says which). Unsigned entries carry only the
checksum: it catches accidental corruption, not an attacker, who can recompute it. With a shared
secret (``secret=`` or ``$KVCOMM_STORE_KEY``) an entry is signed: ``MAC = HMAC-SHA256(secret,
domain | len+namespace | len+key | checksum)``, the domain ``b"kvcomm-entry-mac/1"`` (SHA-256) or
``b"kvcomm-entry-mac/1+blake3"``. Both checksums are collision resistant and cover the flags,
header and payload, so the MAC authenticates every byte of the value *and* the namespace and key
it is stored under: a value copied to another key or namespace, or written without the secret,
fails. A reader with a secret rejects unsigned entries (``unsigned``) and bad MACs (``bad_mac``);
a reader without one still checks the checksum of signed entries. The MAC does not encrypt:
whoever can read the Redis can read the KV.

Where these bytes sit in a value is :mod:`kvcomm.store.framing`'s layout.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

from kvcomm.errors import EntryFormatError, StoreError

_blake3: Any
try:  # the fast checksum; without it entries are written with SHA-256 and BLAKE3 ones are misses
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; this is the fallback
    _blake3 = None

FLAG_SIGNED = 1
FLAG_BLAKE3 = 2
MAC_BYTES = 32
_MAC_DOMAIN = b"kvcomm-entry-mac/1"
#: checksum algorithms; entries are written with DEFAULT_DIGEST, read with either
DIGESTS = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3" if _blake3 is not None else "sha256"


def check_digest(digest: str) -> None:
    if digest not in DIGESTS:
        raise StoreError(f"unknown checksum {digest!r}: use one of {', '.join(DIGESTS)}")
    if digest == "blake3" and _blake3 is None:
        raise StoreError("the blake3 checksum needs the blake3 package (pip install blake3), or use digest='sha256'")


def checksum(buf: bytes | bytearray | memoryview, header_off: int, flags: int) -> bytes:
    """The checksum of a value: over bytes [4, 12) (version, flags, header length) and [header_off,
    end) (header, padding, payload); the framing puts it at bytes [12, 44)."""
    view = memoryview(buf)
    if flags & FLAG_BLAKE3:
        if _blake3 is None:
            raise EntryFormatError("version", "the entry's checksum is BLAKE3 and the blake3 package is not installed")
        h: Any = _blake3.blake3(view[4:12])
    else:
        h = hashlib.sha256(view[4:12])
    h.update(view[header_off:])  # both release the GIL on large buffers
    return bytes(h.digest())


def entry_mac(secret: bytes, namespace: str, key: str, digest: bytes, flags: int) -> bytes:
    """HMAC-SHA256 of the checksum, bound to the namespace and key (length-prefixed: unambiguous)."""
    ns, k = namespace.encode("utf-8"), key.encode("utf-8")
    domain = _MAC_DOMAIN + (b"+blake3" if flags & FLAG_BLAKE3 else b"")
    msg = b"".join((domain, struct.pack("<I", len(ns)), ns, struct.pack("<I", len(k)), k, digest))
    return hmac.new(secret, msg, hashlib.sha256).digest()


__all__ = [
    "DEFAULT_DIGEST", "DIGESTS", "FLAG_BLAKE3", "FLAG_SIGNED", "MAC_BYTES", "check_digest", "checksum", "entry_mac",
]
