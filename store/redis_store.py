"""RedisStore: entries, counters and records in a (shared) Redis server or Redis Cluster, on redis-py.

Security (see also :mod:`kvcomm.store.security` and :mod:`kvcomm.store.codec`): credentials and
TLS come from the URL (``redis://user:pass@host:6379/0``, ``rediss://...?ssl_ca_certs=ca.pem``,
``redis+cluster://user:pass@h1:7000,h2:7000``) or redis-py keyword arguments; the password is
redacted from every message, warning, ``repr`` and ``stats()``. With a secret, entries are signed
and only signed entries are accepted. Reads are bounded per entry (``max_entry_bytes``, enforced by
``GETRANGE`` before the value crosses the wire) and, optionally, in total (``max_fetch_bytes`` per
``fetch_window`` seconds).

Speed (:mod:`kvcomm.store.wire`, :mod:`kvcomm.store.buffers`): reads of entries go out as one
pipelined batch per server (every shard of a cluster at once), and each reply is received
straight into a reused buffer that the decoded tensors then view, without further copies.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvcomm.errors import EntryFormatError, StoreError
from kvcomm.keys import is_chunk_key, namespace_prefix, parse_key
from kvcomm.store import chunks
from kvcomm.store.base import KVStore, check_key
from kvcomm.store.buffers import BufferPool, writable
from kvcomm.store.codec import DEFAULT_MAX_ENTRY_BYTES, decode, encode
from kvcomm.store.entry import KVEntry
from kvcomm.store.nodes import Cluster, Node, SingleServer, TopologyError
from kvcomm.store.redis_io import AUTH_ERRORS, Read, ServerIO, glob_escape, node_usage, url_user
from kvcomm.store.security import redact, resolve_secret, scrub
from kvcomm.store.spec import RedisSpec
from kvcomm.store.url import DEFAULT_REDIS_URL, redis_spec

DEFAULT_URL = DEFAULT_REDIS_URL

__all__ = ["DEFAULT_URL", "RedisStore", "redact"]


class RedisStore(ServerIO, KVStore):
    """A store on one Redis server or a Redis Cluster, shared across processes and hosts.

    Each entry is one Redis string written by one ``SET`` (header and payload in one value), so a
    reader sees the old or the new entry, never half of one. An entry larger than ``chunk_bytes``
    is written as chunk keys and then a manifest under its key (:mod:`kvcomm.store.chunks`); on a
    cluster the chunks spread over the shards. Entries are read with ``GETRANGE`` capped at
    ``max_entry_bytes`` + 1, so an oversize value is never transferred whole; :meth:`get_many`
    reads many in one pipelined round trip per server. The anchor-pool maps are Redis hashes
    (``pool_increment`` is ``HINCRBY``), records are ``RPUSH``-ed JSON: both atomic across processes.

    Every Redis error degrades (``get`` -> None, ``put`` -> False, ``pool_increment`` -> None, ...)
    with one :class:`~kvcomm.errors.StoreFaultWarning` per fault kind and a counter; refused
    credentials and ACL denials count as ``auth``. After a connection or auth fault the server
    (on a cluster: that shard only) is skipped for ``retry_after`` seconds, so a dead server costs
    nothing per call while the other shards keep serving; then it is tried again. Construction
    does not connect unless ``check=True``; :meth:`ping` does.

    ``RedisStore(url, **options)`` and ``RedisStore.from_spec(spec)`` build the same store: the
    first parses ``url`` into a :class:`~kvcomm.store.spec.RedisSpec`
    (:func:`~kvcomm.store.url.redis_spec`), the second takes one already parsed
    (:func:`kvcomm.store.from_url` does so).

    Args:
        url: a connection URL: ``redis://[user:pass@]host:port/db``, ``rediss://...`` (TLS;
            redis-py's ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` ...
            as query parameters or keywords), ``unix://``, or a Redis Cluster:
            ``redis+cluster://[user:pass@]host:port[,host:port...]`` (``rediss+cluster://`` with
            TLS); kvcomm's options are the keywords below. None: the Redis URL of
            :func:`~kvcomm.store.url.store_urls_from_env`.
        namespace: keys live under ``kvcomm:<namespace>:``; the namespace is also in every MAC.
        ttl: default seconds to live of an entry (None or 0: no expiry); counters never expire.
        codec: ``"raw"`` (bit exact) or ``"int8"`` (K per channel, V per token; ~half of bf16).
        device: where decoded tensors are placed (int8 is dequantized there; for a CUDA device
            replies are received into pinned memory and copied asynchronously).
        max_entry_bytes: larger entries are neither written nor read (fault ``oversize``).
        max_fetch_bytes: if set, at most this many entry bytes are read per ``fetch_window``
            seconds (a fixed window per store object, shared by its threads); a get that would
            go over is a miss (fault ``budget``) and reads at most the budget left.
        fetch_window: seconds after which the fetch budget resets.
        chunk_bytes: encoded entries larger than this are stored in chunks of this size.
        buffer_bytes: bytes of receive buffers kept for reuse (0: a new buffer per read).
        secret: HMAC-SHA256 key (str or bytes, >= 16 bytes) that signs every entry written and
            must have signed every entry read; None: ``$KVCOMM_STORE_KEY``; ``""``: unsigned.
        check: ping at construction and raise :class:`~kvcomm.errors.StoreError` (one line,
            password redacted) if the server is unreachable or refuses the credentials.
        socket_timeout, socket_connect_timeout: seconds before a call fails as ``timeout``.
        socket_read_size: bytes per socket read of redis-py's own parser (small replies).
        retry_after: seconds to skip a server after a connection fault or timeout.
        **redis_kwargs: passed to ``redis.Redis.from_url`` / ``RedisCluster`` (``username``,
            ``password``, TLS options, ...).
    """

    kind = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str = "default",
        ttl: float | None = None,
        codec: str = "raw",
        device: str | torch.device = "cpu",
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_fetch_bytes: int | None = None,
        fetch_window: float = 1.0,
        chunk_bytes: int | None = None,
        buffer_bytes: int | None = None,
        secret: str | bytes | None = None,
        check: bool = False,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        socket_read_size: int = 4 << 20,
        retry_after: float = 1.0,
        **redis_kwargs: Any,
    ) -> None:
        sizes = {k: v for k, v in (("chunk_bytes", chunk_bytes), ("buffer_bytes", buffer_bytes)) if v is not None}
        spec = redis_spec(
            url,
            namespace=namespace,
            ttl=ttl,
            codec=codec,
            device=str(device),
            max_entry_bytes=max_entry_bytes,
            max_fetch_bytes=max_fetch_bytes,
            fetch_window=fetch_window,
            retry_after=retry_after,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            socket_read_size=socket_read_size,
            client_kwargs=redis_kwargs,
            **sizes,
        )
        self._open(spec, secret=secret, check=check)

    @classmethod
    def from_spec(cls, spec: RedisSpec, *, secret: str | bytes | None = None, check: bool = False) -> RedisStore:
        """The store a parsed spec describes (:func:`kvcomm.store.url.parse_store_url`); see the class."""
        store = cls.__new__(cls)
        store._open(spec, secret=secret, check=check)
        return store

    def _open(self, spec: RedisSpec, *, secret: str | bytes | None, check: bool) -> None:
        """Set up from a spec, trusted as is: every field was checked when it was built."""
        KVStore.__init__(self, spec.namespace)
        self.spec = spec
        self.kind = "redis-cluster" if spec.cluster else "redis"
        self._secrets = list(spec.secrets)
        self._secret = resolve_secret(secret)
        self.url = spec.display_url  # the password stays in the connection pool only
        self.ttl = spec.ttl
        self.codec = spec.codec
        self.device = torch.device(spec.device)
        self.max_entry_bytes = spec.max_entry_bytes
        self.max_fetch_bytes = spec.max_fetch_bytes
        self.fetch_window = spec.fetch_window
        self.chunk_bytes = spec.chunk_bytes
        self.retry_after = spec.retry_after
        self._prefix = namespace_prefix(spec.namespace)
        self._buffers = BufferPool(spec.buffer_bytes, pin=self.device.type == "cuda")
        self._budget_lock = threading.Lock()
        self._window_start = time.monotonic()
        self._fetched = 0
        self._topology_skip_until = 0.0
        client_kwargs: dict[str, Any] = {k: v for k, v in spec.client_kwargs.items() if k != "decode_responses"}
        # RESP2 unless asked otherwise: no push messages between replies (redis-py 8 defaults to RESP3)
        client_kwargs.setdefault("protocol", 2)
        timeouts = {"socket_timeout": spec.socket_timeout, "socket_connect_timeout": spec.socket_connect_timeout,
                    "socket_read_size": spec.socket_read_size}
        try:
            if spec.cluster:
                self.topology = Cluster(spec, {**timeouts, **client_kwargs})
            else:
                client = redis.Redis.from_url(
                    spec.url, **timeouts,
                    # one immediate retry re-dials a connection the server dropped (restart);
                    # timeouts are not retried, they would only double the wait
                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                    **client_kwargs,
                )
                self.topology = SingleServer(self.url, client)
        except (ValueError, TypeError) as exc:
            raise StoreError(self._scrub(f"bad Redis URL {self.url!r}: {exc}")) from None
        if check:
            try:
                self.ping()
            except BaseException:
                self.topology.close()
                raise

    @property
    def client(self) -> Any:
        """The redis-py client: ``redis.Redis`` for one server, ``RedisCluster`` for a cluster."""
        return self.topology.client if isinstance(self.topology, Cluster) else self.topology.primaries()[0].client

    @property
    def signed(self) -> bool:
        """Whether this store signs what it writes and accepts only signed entries."""
        return self._secret is not None

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, namespace={self.namespace!r}, codec={self.codec!r}, signed={self.signed})"

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    # -- entries -------------------------------------------------------------------------------
    def get(self, key: str, *, fingerprint: str | None = None) -> KVEntry | None:
        check_key(key)
        cap = self._budget_left()
        if cap <= 0:
            self._fault("budget", f"GET {key!r}: the fetch budget of {self.max_fetch_bytes} bytes per "
                                  f"{self.fetch_window:g} s is spent")
            self.counters.miss()
            return None
        return self._get_entries([key], fingerprint, cap)[0]

    def get_many(self, keys: Sequence[str], *, fingerprint: str | None = None) -> list[KVEntry | None]:
        """The entries under ``keys`` in one pipelined round trip per server (chunked entries: one
        more for their chunks). With a fetch budget, one key at a time (the budget is exact)."""
        keys = list(keys)
        for key in keys:
            check_key(key)
        if self.max_fetch_bytes is not None:
            return [self.get(key, fingerprint=fingerprint) for key in keys]
        return self._get_entries(keys, fingerprint, self.max_entry_bytes) if keys else []

    def _get_entries(self, keys: list[str], fingerprint: str | None, cap: int) -> list[KVEntry | None]:
        fulls = [self._prefix + key for key in keys]
        what = f"GET {keys[0]!r}" if len(keys) == 1 else f"GET of {len(keys)} keys"
        reads = self._read_values(fulls, [cap] * len(keys), what)
        out: list[KVEntry | None] = [None] * len(keys)
        sizes = [read.length for read in reads]
        manifests: dict[int, chunks.Manifest] = {}
        for i, (key, read) in enumerate(zip(keys, reads, strict=True)):
            if read.fault is not None:
                self._fault(*read.fault)
                continue
            if read.length == 0:  # a missing key
                continue
            self._charge(read.length)
            if read.length > cap and cap < self.max_entry_bytes:
                self._fault("budget", f"GET {key!r}: the value is larger than the {cap} bytes left of the fetch "
                                      f"budget ({self.max_fetch_bytes} bytes per {self.fetch_window:g} s)")
                continue
            if read.buffer is not None and chunks.is_manifest(read.blob()[:4]):
                try:
                    manifest = chunks.parse(read.blob(), max_total=self.max_entry_bytes)
                except EntryFormatError as exc:
                    self._fault(exc.kind, f"entry {key!r}: {exc}")
                    continue
                if manifest.total > cap:
                    self._fault("budget", f"GET {key!r}: the chunked entry of {manifest.total} bytes is larger than "
                                          f"the {cap} bytes left of the fetch budget")
                    continue
                manifests[i] = manifest
                continue
            out[i] = self._decode(key, read, fingerprint)
        if manifests:
            for i, read in self._read_chunked({i: (keys[i], m) for i, m in manifests.items()}).items():
                if read.fault is not None:
                    self._fault(*read.fault)
                    continue
                self._charge(read.length)
                sizes[i] = read.length
                out[i] = self._decode(keys[i], read, fingerprint)
        for entry, size in zip(out, sizes, strict=True):
            if entry is None:
                self.counters.miss()
            else:
                self.counters.hit(size)
        return out

    def _decode(self, key: str, read: Read, fingerprint: str | None) -> KVEntry | None:
        if read.buffer is None:  # longer than max_entry_bytes: dropped unread
            self._fault("oversize", f"entry {key!r}: value of more than {self.max_entry_bytes} bytes is over "
                                    f"max_entry_bytes")
            return None
        try:
            entry = decode(read.blob(), namespace=self.namespace, key=key, fingerprint=fingerprint,
                           max_entry_bytes=self.max_entry_bytes, device=self.device, secret=self._secret, owned=True)
        except EntryFormatError as exc:
            self._fault(exc.kind, f"entry {key!r}: {exc}")
            return None
        if self.device.type == "cuda":  # the copies from the pinned buffer are done before it is reused
            torch.cuda.current_stream(self.device).synchronize()
        return entry

    def _read_chunked(self, wanted: dict[int, tuple[str, chunks.Manifest]]) -> dict[int, Read]:
        """Every chunk of every manifest in one batch per server, each into its place in one buffer."""
        out = {i: Read(length=m.total, buffer=self._buffers.take(m.total)) for i, (_, m) in wanted.items()}
        fulls, caps, places = [], [], []
        for i, (key, manifest) in wanted.items():
            for c in range(manifest.count):
                start, stop = manifest.span(c)
                fulls.append(self._prefix + manifest.key(key, c))
                caps.append(stop - start)  # GETRANGE 0 cap: one byte more than a chunk may hold
                places.append((i, start, stop, c))

        def into(j: int, n: int) -> memoryview | None:
            i, start, stop, _ = places[j]
            buffer = out[i].buffer
            return writable(buffer)[start:stop] if buffer is not None and n == stop - start else None

        reads = self._read_values(fulls, caps, f"GET chunks of {len(wanted)} entries", sink=into)
        for (i, start, stop, c), read in zip(places, reads, strict=True):
            if out[i].fault is not None:
                continue
            key, manifest = wanted[i]
            where = f"entry {key!r}: chunk {c} of {manifest.count}"
            if read.fault is not None:
                out[i].fault = (read.fault[0], f"{where}: {read.fault[1]}")
            elif read.length == 0:
                out[i].fault = ("truncated", f"{where} is missing (evicted or expired)")
            elif read.length != stop - start:
                kind = "truncated" if read.length < stop - start else "corrupt"
                out[i].fault = (kind, f"{where} holds {read.length} bytes, the manifest says {stop - start}")
        for read in out.values():
            if read.fault is not None:
                read.buffer = None
        return out

    def put(self, key: str, entry: KVEntry, *, ttl: float | None = None) -> bool:
        full = self._full(key)
        if entry.nbytes > 2 * self.max_entry_bytes:  # skip quantizing what cannot fit anyway
            return self._reject(key, entry.nbytes)
        blob = encode(entry, namespace=self.namespace, key=key, codec=self.codec, secret=self._secret)
        if len(blob) > self.max_entry_bytes:
            return self._reject(key, len(blob))
        ttl = self.ttl if ttl is None else ttl
        px = max(1, int(ttl * 1000)) if ttl else None
        manifest = None
        if len(blob) > self.chunk_bytes:
            manifest = chunks.plan(len(blob), self.chunk_bytes, blob[:8])
            if not self._put_chunks(key, manifest, memoryview(blob), px):
                self.counters.put_failed()
                return False
        value = manifest.encode() if manifest is not None else blob
        old = self._on_key(full, f"SET {key!r}", lambda c: self._swap(c, full, value, px), None)
        if old is None:
            if manifest is not None:
                self._unlink(self._chunk_fulls(key, manifest), f"UNLINK chunks of {key!r}")
            self.counters.put_failed()
            return False
        self._drop_old_chunks(key, old, keep=manifest)
        self.counters.put(len(blob))
        return True

    @staticmethod
    def _swap(client: redis.Redis, full: str, value: bytes | bytearray, px: int | None) -> bytes:
        """Set ``full`` and return the start of its old value (a manifest names chunks to drop)."""
        pipe = client.pipeline(transaction=True)
        pipe.getrange(full, 0, chunks.MANIFEST_MAX_BYTES - 1)
        pipe.set(full, value, px=px)
        head, _ = pipe.execute()
        return cast(bytes, head)

    def _chunk_fulls(self, key: str, manifest: chunks.Manifest) -> list[str]:
        return [self._prefix + k for k in manifest.keys(key)]

    def _drop_old_chunks(self, key: str, head: bytes, keep: chunks.Manifest | None = None) -> None:
        if not chunks.is_manifest(head):
            return
        try:
            old = chunks.parse(head, max_total=1 << 62)
        except EntryFormatError:
            return
        if keep is None or old.generation != keep.generation:
            self._unlink(self._chunk_fulls(key, old), f"UNLINK old chunks of {key!r}")

    def _put_chunks(self, key: str, manifest: chunks.Manifest, view: memoryview, px: int | None) -> bool:
        """Write every chunk (one batch per server, all at once); False (and none left) on a fault."""
        fulls = self._chunk_fulls(key, manifest)
        what = f"SET chunks of {key!r}"
        groups = self._route(fulls, what)
        if groups is None:
            return False
        expiry: tuple[Any, ...] = ("PX", px) if px else ()
        work: dict[Node, tuple[list[tuple[Any, ...]], list[Any]]] = {}
        for node, idx in groups.items():
            commands: list[tuple[Any, ...]] = []
            for c in idx:
                start, stop = manifest.span(c)
                commands.append(("SET", fulls[c], view[start:stop], *expiry))
            work[node] = (commands, [None] * len(commands))
        ok = True
        for node, result in self._exchange(work, what).items():
            if isinstance(result, tuple):
                self._fault(*result)
                ok = False
                continue
            for reply in result:
                if reply.kind == "error":
                    self._fault(*self._reply_fault(node, reply, what))
                    ok = False
                    break
        if not ok:
            self._unlink(fulls, f"UNLINK chunks of {key!r}")
        return ok

    def _reject(self, key: str, nbytes: int) -> bool:
        self._fault("oversize", f"entry {key!r} of {nbytes} bytes is over max_entry_bytes={self.max_entry_bytes}")
        self.counters.put_failed()
        self.delete(key)  # drop the stale one
        return False

    def delete(self, key: str) -> bool:
        full = self._full(key)

        def run(client: redis.Redis) -> tuple[bytes, int]:
            pipe = client.pipeline(transaction=True)
            pipe.getrange(full, 0, chunks.MANIFEST_MAX_BYTES - 1)
            pipe.unlink(full)
            head, n = pipe.execute()
            return cast(bytes, head), int(n)

        head, removed = self._on_key(full, f"UNLINK {key!r}", run, (b"", 0))
        self._drop_old_chunks(key, head)
        return bool(removed)

    def contains(self, key: str) -> bool:
        full = self._full(key)
        return bool(self._on_key(full, f"EXISTS {key!r}", lambda c: c.exists(full), 0))

    def scan(self, prefix: str = "") -> list[str]:
        pattern = glob_escape(self._prefix + prefix) + "*"
        n = len(self._prefix)
        keys = [k.decode("utf-8", "replace")[n:] for node in self._primaries("SCAN")
                for k in self._scan_node(node, pattern)]
        return sorted(k for k in keys if not is_chunk_key(k))

    def clear(self, prefix: str = "") -> int:
        pattern = glob_escape(self._prefix + prefix) + "*"
        n = len(self._prefix)
        removed = 0
        for node in self._primaries("clear"):
            keys = self._scan_node(node, pattern)
            names = [k.decode("utf-8", "replace") for k in keys]
            gone = self._unlink_on(node, names, "clear")
            removed += sum(1 for name, ok in zip(names, gone, strict=True) if ok and not is_chunk_key(name[n:]))
        if prefix:  # the chunks of the entries just removed (their keys start with the chunk prefix)
            orphans = []
            for node in self._primaries("clear"):
                for k in self._scan_node(node, glob_escape(self._prefix + "~chunk:") + "*"):
                    rel = k.decode("utf-8", "replace")[n:]
                    try:
                        entry = getattr(parse_key(rel), "entry", "")
                    except StoreError:
                        continue
                    if entry.startswith(prefix):
                        orphans.append(self._prefix + rel)
            self._unlink(orphans, "clear")
        return removed

    # -- anchor-pool state (Redis hashes) and records (Redis lists) ---------------------------------
    def pool_read(self, key: str) -> dict[str, str]:
        full = self._full(key)
        empty: dict[bytes, bytes] = {}
        raw = self._on_key(full, f"HGETALL {key!r}", lambda c: cast("dict[bytes, bytes]", c.hgetall(full)), empty)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def pool_read_many(self, keys: Sequence[str]) -> list[dict[str, str]]:
        """``HGETALL`` of every map in one pipelined round trip per server."""
        fulls = [self._full(key) for key in keys]
        out: list[dict[str, str]] = [{} for _ in fulls]
        what = f"HGETALL of {len(fulls)} maps"
        groups = self._route(fulls, what) if fulls else {}
        if not groups:
            return out
        work = {node: ([("HGETALL", fulls[i]) for i in idx], [None] * len(idx)) for node, idx in groups.items()}
        for node, result in self._exchange(cast(Any, work), what).items():
            if isinstance(result, tuple):
                for _ in groups[node]:
                    self._fault(*result)
                continue
            for i, reply in zip(groups[node], result, strict=True):
                if reply.kind == "error":
                    self._fault(*self._reply_fault(node, reply, what))
                elif isinstance(reply.value, list):
                    items = reply.value
                    out[i] = {bytes(items[j]).decode(): bytes(items[j + 1]).decode() for j in range(0, len(items) - 1, 2)}
        return out

    def pool_write(self, key: str, mapping: dict[str, str | int | float]) -> bool:
        full = self._full(key)
        if not mapping:
            return True
        fields: dict[Any, Any] = dict(mapping)  # redis-py's own key/value union
        return self._on_key(full, f"HSET {key!r}", lambda c: c.hset(full, mapping=fields) is not None, False)

    def pool_remove(self, key: str, *fields: str) -> int:
        full = self._full(key)
        if not fields:
            return 0
        return int(self._on_key(full, f"HDEL {key!r}", lambda c: c.hdel(full, *fields), 0))

    def pool_increment(self, key: str, field: str, amount: int = 1) -> int | None:
        full = self._full(key)
        return self._on_key(full, f"HINCRBY {key!r}", lambda c: int(c.hincrby(full, field, amount)), None)

    def append_record(self, key: str, record: dict[str, Any]) -> bool:
        full = self._full(key)
        try:
            line = json.dumps(record)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"record for {key!r} is not JSON-serializable: {exc}") from None
        return self._on_key(full, f"RPUSH {key!r}", lambda c: c.rpush(full, line) > 0, False)

    def read_records(self, key: str) -> list[dict[str, Any]]:
        full = self._full(key)
        out: list[dict[str, Any]] = []
        none: list[bytes] = []
        for line in self._on_key(full, f"LRANGE {key!r}", lambda c: cast("list[bytes]", c.lrange(full, 0, -1)), none):
            try:
                record = json.loads(line)
            except ValueError:
                self._fault("corrupt", f"record list {key!r} holds a line that is not JSON")
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    # -- housekeeping ------------------------------------------------------------------------------
    def ping(self) -> None:
        try:
            nodes = self.topology.primaries()
            for node in nodes:
                node.client.ping()
        except AUTH_ERRORS as exc:
            who = self.spec.client_kwargs.get("username") or url_user(self.spec.url) or "default"
            raise StoreError(self._scrub(
                f"Redis at {self.url} refused the credentials of user {who!r} (wrong or missing password, "
                f"or a disabled user): {type(exc).__name__}: {exc}"
            )) from None
        except (redis.RedisError, TopologyError) as exc:
            raise StoreError(self._scrub(f"Redis at {self.url} is not reachable: {type(exc).__name__}: {exc}")) from None

    def usage(self) -> dict[str, Any]:
        """What this namespace holds, in total and per server (``shards``): keys, entries, their
        bytes, signed and unsigned entries, and each server's memory use and eviction policy."""
        totals: dict[str, Any] = dict.fromkeys(("keys", "entries", "entry_bytes", "signed_entries",
                                               "unsigned_entries", "chunks"), 0)
        shards = []
        for node in self._primaries("usage"):
            row = self._run(node, "usage", lambda c: node_usage(c, self._prefix), None)
            if row is None:
                shards.append({"node": node.name, "error": "unreachable"})
                continue
            shards.append({"node": node.name, **row})
            for name in totals:
                totals[name] += row[name]
        return {**totals, "shards": shards}

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "url": self.url,
            "codec": self.codec,
            "ttl": self.ttl,
            "signed": self.signed,
            "integrity": "hmac-sha256 (signed)" if self.signed else "checksum only (unsigned)",
            "max_entry_bytes": self.max_entry_bytes,
            "max_fetch_bytes": self.max_fetch_bytes,
            "chunk_bytes": self.chunk_bytes,
            "buffers": self._buffers.stats(),
        }

    def close(self) -> None:
        self.topology.close()
        self._buffers.clear()

    # -- fetch budget ----------------------------------------------------------------------------------
    def _budget_left(self) -> int:
        """Bytes this get may read: max_entry_bytes, or less when the fetch budget is nearly spent."""
        if self.max_fetch_bytes is None:
            return self.max_entry_bytes
        with self._budget_lock:
            now = time.monotonic()
            if now - self._window_start >= self.fetch_window:
                self._window_start, self._fetched = now, 0
            return min(self.max_entry_bytes, self.max_fetch_bytes - self._fetched)

    def _charge(self, nbytes: int) -> None:
        if self.max_fetch_bytes is not None:
            with self._budget_lock:
                self._fetched += nbytes

