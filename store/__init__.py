"""kvcomm.store: where KV entries, anchor pools and metrics live (memory, Redis, tiers of both).

``from_url("memory://?max_bytes=8GiB&device=cuda", "redis://host:6379/0?namespace=team1")``
gives a TieredStore; every store implements :class:`KVStore` and degrades faults to misses.

Security: Redis credentials and TLS in the URL (``rediss://user:pass@host:6380/0?ssl_ca_certs=ca.pem``,
or ``$KVCOMM_REDIS_URL``), redacted everywhere; entries signed with HMAC-SHA256 when a secret is
set (``secret=`` or ``$KVCOMM_STORE_KEY``), bound to their namespace and key; bounded reads. See
:mod:`kvcomm.store.security`, :mod:`kvcomm.store.codec` and :class:`RedisStore`.
"""

from __future__ import annotations

from kvcomm.store.base import FAULT_KINDS, KVStore, StoreStats
from kvcomm.store.codec import FORMAT_VERSION, EntryFormatError, decode, encode
from kvcomm.store.entry import KVEntry
from kvcomm.store.memory import MemoryStore
from kvcomm.store.redis_store import RedisStore
from kvcomm.store.security import redact
from kvcomm.store.tiered import TieredStore
from kvcomm.store.url import from_url, parse_size

__all__ = [
    "EntryFormatError",
    "FAULT_KINDS",
    "FORMAT_VERSION",
    "KVEntry",
    "KVStore",
    "MemoryStore",
    "RedisStore",
    "StoreStats",
    "TieredStore",
    "decode",
    "encode",
    "from_url",
    "parse_size",
    "redact",
]
