"""kvcomm.store: where KV entries, anchor pools and metrics live (memory, Redis, tiers of both).

``from_url("memory://?max_bytes=8GiB&device=cuda", "redis://host:6379/0?namespace=team1")``
gives a TieredStore; every store implements :class:`KVStore` (entries, batched ``get_many``,
anchor-pool state, records) and degrades faults to misses. URLs are parsed once into specs
(:func:`parse_store_url`: :class:`MemorySpec`, :class:`RedisSpec`); with no URL,
:func:`store_urls_from_env` names the store. A Redis Cluster is ``redis+cluster://h1:7000,h2:7000``
(:mod:`kvcomm.store.nodes`); entries larger than ``chunk_bytes`` are stored in chunks
(:mod:`kvcomm.store.chunks`); replies are read straight into reused buffers
(:mod:`kvcomm.store.wire`, :mod:`kvcomm.store.buffers`).

Security: Redis credentials and TLS in the URL (``rediss://user:pass@host:6380/0?ssl_ca_certs=ca.pem``,
or ``$KVCOMM_STORE_URL`` / ``$KVCOMM_REDIS_URL``), redacted everywhere; entries signed with HMAC-SHA256 when a secret is
set (``secret=`` or ``$KVCOMM_STORE_KEY``), bound to their namespace and key; bounded reads. See
:mod:`kvcomm.store.security`, :mod:`kvcomm.store.codec` and :class:`RedisStore`.
"""

from __future__ import annotations

if __name__ == "store":  # the clone's root on sys.path: an installed `store` gets the name
    from kvcomm._shadow import hand_over

    hand_over(__name__, __file__)

from kvcomm.errors import EntryFormatError
from kvcomm.store.base import FAULT_KINDS, KVStore, StoreStats
from kvcomm.store.codec import FORMAT_VERSION, decode, encode
from kvcomm.store.entry import KVEntry
from kvcomm.store.factory import from_url, open_store
from kvcomm.store.memory import MemoryStore
from kvcomm.store.redis_store import RedisStore
from kvcomm.store.security import redact
from kvcomm.store.spec import MemorySpec, RedisSpec, StoreSpec
from kvcomm.store.tiered import TieredStore
from kvcomm.store.url import parse_size, parse_store_url, parse_store_urls, store_urls_from_env

__all__ = [
    "EntryFormatError",
    "FAULT_KINDS",
    "FORMAT_VERSION",
    "KVEntry",
    "KVStore",
    "MemorySpec",
    "MemoryStore",
    "RedisSpec",
    "RedisStore",
    "StoreSpec",
    "StoreStats",
    "TieredStore",
    "decode",
    "encode",
    "from_url",
    "open_store",
    "parse_size",
    "parse_store_url",
    "parse_store_urls",
    "redact",
    "store_urls_from_env",
]
