"""The KVStore interface, its counters and the warn-once fault reporting every store shares."""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from kvcomm.errors import StoreError, StoreFaultWarning
from kvcomm.store.entry import KVEntry

logger = logging.getLogger(__name__)

#: Every fault kind a store counts. A fault degrades the call to a miss (get) or False (put).
FAULT_KINDS = (
    "unreachable",  # connection refused / reset / server gone
    "timeout",  # socket timeout
    "server_error",  # any other error the server answered with (WRONGTYPE, OOM, ...)
    "auth",  # credentials refused (WRONGPASS, NOAUTH) or an ACL forbids the command or key (NOPERM)
    "corrupt",  # checksum mismatch, undecodable header, unknown dtype or codec
    "truncated",  # fewer bytes than the header promises
    "version",  # written by another format version
    "fingerprint_mismatch",  # computed by another model
    "shape",  # shape inconsistent with the byte count
    "oversize",  # larger than the store accepts
    "key_mismatch",  # the header names another namespace or key (a copied or swapped value)
    "unsigned",  # the store has a secret and the entry carries no MAC
    "bad_mac",  # the MAC does not verify: forged, tampered, or copied from another key/namespace
    "budget",  # the read would exceed the store's fetch budget (max_fetch_bytes per fetch_window)
)

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is a valid namespace, else raise StoreError.

    A namespace may not contain ``:`` (``a:b`` + key ``c`` would collide with ``a`` + ``b:c``) nor
    glob characters (it is part of SCAN patterns).
    """
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise StoreError(
            f"bad namespace {namespace!r}: use 1-128 characters from A-Z a-z 0-9 _ . -"
        )
    return namespace


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid relative key (a non-empty str without whitespace)."""
    if not isinstance(key, str) or not key or any(c.isspace() for c in key):
        raise StoreError(f"bad store key {key!r}: a key is a non-empty string without whitespace")
    return key


def _caller_level() -> int:
    """The warnings stacklevel of the first frame outside kvcomm.store (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("kvcomm.store"):
        frame, level = frame.f_back, level + 1
    return level


class StoreStats:
    """Thread-safe counters: hits, misses, puts, bytes moved, faults per kind, and the request/response
    exchanges with servers (``round_trips``; a batch sent to three shards at once counts three)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = self.puts = self.put_failures = 0
        self.bytes_read = self.bytes_written = 0
        self.round_trips = 0
        self.faults = dict.fromkeys(FAULT_KINDS, 0)

    def hit(self, nbytes: int) -> None:
        with self._lock:
            self.hits += 1
            self.bytes_read += nbytes

    def miss(self) -> None:
        with self._lock:
            self.misses += 1

    def put(self, nbytes: int) -> None:
        with self._lock:
            self.puts += 1
            self.bytes_written += nbytes

    def put_failed(self) -> None:
        with self._lock:
            self.put_failures += 1

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def round_trip(self, n: int = 1) -> None:
        with self._lock:
            self.round_trips += n

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "puts": self.puts,
                "put_failures": self.put_failures,
                "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written,
                "round_trips": self.round_trips,
                "faults": dict(self.faults),
            }


class KVStore(ABC):
    """What the engine needs from a store: KV entries, anchor-pool state and call records.

    - entries: :class:`KVEntry` objects under keys (``get``/``put``/``delete``/``contains``/
      ``scan``/``clear``);
    - anchor-pool state: small string maps with atomic counters (``pool_read``/``pool_write``/
      ``pool_remove``/``pool_increment``);
    - records: append-only JSON lists (``append_record``/``read_records``).

    Keys are relative (see :mod:`kvcomm.keys`); a store prefixes them with
    :func:`kvcomm.keys.namespace_prefix` (``kvcomm:<namespace>:``). Every read or write that hits
    a fault (unreachable server, timeout, corrupt or foreign entry, ...) degrades: ``get``
    returns None, ``put`` returns False, ``pool_increment`` returns None, a
    :class:`~kvcomm.errors.StoreFaultWarning` is emitted once per fault kind, and
    ``stats()["faults"][kind]`` increments. Only caller bugs (a bad key, an entry that cannot be
    serialized) raise :class:`~kvcomm.errors.StoreError`.
    """

    #: short backend name shown in stats()
    kind = "abstract"

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = check_namespace(namespace)
        self.counters = StoreStats()
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()

    # -- entries -----------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str, *, fingerprint: str | None = None) -> KVEntry | None:
        """The entry under ``key``, or None on a miss or any fault.

        Args:
            key: relative key.
            fingerprint: if given, an entry stored with another fingerprint is a miss (counted
                as ``fingerprint_mismatch``). Comparison is exact: ``""`` only matches ``""``.
        """

    def get_many(self, keys: Sequence[str], *, fingerprint: str | None = None) -> list[KVEntry | None]:
        """The entries under ``keys`` (None for each miss or fault), in order, as one batch.

        Stores that talk to a server answer in one pipelined round trip (one per shard, all sent
        at once); this default asks :meth:`get` for each key. Faults count per key, as in ``get``.
        """
        return [self.get(key, fingerprint=fingerprint) for key in keys]

    @abstractmethod
    def put(self, key: str, entry: KVEntry, *, ttl: float | None = None) -> bool:
        """Store ``entry`` under ``key`` atomically (a reader sees the old or the new entry).

        Args:
            ttl: seconds to live; None uses the store's default, 0 means no expiry.

        Returns:
            True if stored, False if the write degraded (fault, or the entry is over budget).

        Raises:
            StoreError: the key is malformed or the entry cannot be serialized (a caller bug).
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key`` (any type); True if it existed."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether ``key`` exists (False on a fault)."""

    @abstractmethod
    def scan(self, prefix: str = "") -> list[str]:
        """Sorted relative keys (entries, pool maps and record lists) starting with ``prefix``."""

    @abstractmethod
    def clear(self, prefix: str = "") -> int:
        """Remove every key of this namespace starting with ``prefix``; returns how many."""

    # -- anchor-pool state: small string maps with atomic counters ------------------------------
    # The anchor pool of a slot (members, use counts, its creation counter) lives in maps of
    # field -> string that every process sharing the store updates; increments are atomic.
    @abstractmethod
    def pool_read(self, key: str) -> dict[str, str]:
        """Every field of the map under ``key`` ({} when missing or on a fault)."""

    def pool_read_many(self, keys: Sequence[str]) -> list[dict[str, str]]:
        """:meth:`pool_read` of several maps as one batch (one round trip on a server)."""
        return [self.pool_read(key) for key in keys]

    @abstractmethod
    def pool_write(self, key: str, mapping: dict[str, str | int | float]) -> bool:
        """Set fields of the map under ``key`` (values are stored as strings); False on a fault."""

    @abstractmethod
    def pool_remove(self, key: str, *fields: str) -> int:
        """Remove fields of the map under ``key``; how many existed (0 on a fault)."""

    @abstractmethod
    def pool_increment(self, key: str, field: str, amount: int = 1) -> int | None:
        """Atomically add ``amount`` to an integer field (missing: 0); the new value, None on a fault."""

    # -- append-only records (metrics) ----------------------------------------------------------
    @abstractmethod
    def append_record(self, key: str, record: dict[str, Any]) -> bool:
        """Append one JSON-serializable record to the list under ``key``."""

    @abstractmethod
    def read_records(self, key: str) -> list[dict[str, Any]]:
        """Every record appended under ``key``, oldest first."""

    # -- housekeeping ---------------------------------------------------------------------------
    def ping(self) -> None:  # noqa: B027 - optional hook
        """Raise StoreError if the store cannot be reached (for CLIs; the hot path never raises)."""

    def usage(self) -> dict[str, Any]:
        """What this namespace holds: ``keys`` and ``entry_bytes`` (a server store: per shard too)."""
        return {"keys": len(self.scan())}

    def stats(self) -> dict[str, Any]:
        """Counters of this store object (this process): see :class:`StoreStats`."""
        return {"kind": self.kind, "namespace": self.namespace, **self.counters.as_dict()}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and memory. The store is unusable afterwards."""

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for subclasses -------------------------------------------------------------------
    def _fault(self, kind: str, message: str) -> None:
        """Count a fault; warn (StoreFaultWarning) and log the first one of each kind."""
        self.counters.fault(kind)
        message = self._scrub(message)
        with self._warn_lock:
            first = kind not in self._warned
            self._warned.add(kind)
        if first:
            text = f"{self.kind} store ({self.namespace}): {kind}: {message}; degraded to a miss"
            logger.warning("%s", text)
            warnings.warn(text, StoreFaultWarning, stacklevel=_caller_level())
        else:
            logger.debug("%s store fault %s: %s", self.kind, kind, message)

    def _scrub(self, text: str) -> str:
        """``text`` without this store's secrets (stores holding credentials override this)."""
        return text

    def _rearm(self, *kinds: str) -> None:
        """Let the next fault of these kinds warn again (after the store recovered)."""
        if self._warned:
            with self._warn_lock:
                self._warned.difference_update(kinds)
