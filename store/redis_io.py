"""How a RedisStore's commands reach its servers, and how their failures become misses.

:class:`ServerIO` is the half of :class:`~kvcomm.store.RedisStore` that talks to Redis: it maps keys
to servers (:mod:`kvcomm.store.nodes`: one server, or a cluster's shards), runs one command on the
server of a key (following a ``MOVED`` once), sends batches to several servers at once and reads
their replies (:mod:`kvcomm.store.wire`), reads values into reused buffers
(:mod:`kvcomm.store.buffers`), and turns every error into a counted fault kind with a message: a
connection-level fault marks its server to be skipped for ``retry_after`` seconds, so a dead
shard costs nothing per call while the others keep serving.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
import torch
from redis.exceptions import AskError, MovedError

from kvcomm.errors import EntryFormatError
from kvcomm.keys import is_chunk_key
from kvcomm.store import chunks
from kvcomm.store.buffers import BufferPool, writable
from kvcomm.store.framing import MAGIC, is_signed
from kvcomm.store.nodes import Node, Topology, TopologyError
from kvcomm.store.wire import Batch, Reply

T = TypeVar("T")
_REROUTE = object()  # _run's answer to a MOVED/ASK reply where the caller routes again

_SCAN_COUNT = 1000
AUTH_ERRORS = (redis.AuthenticationError, redis.exceptions.AuthorizationError)
_REDIRECTS = ("MOVED ", "ASK ")


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass
class Read:
    """One value read by a batch: its length, the buffer it went into, or why it failed."""

    length: int = 0
    buffer: bytearray | torch.Tensor | None = None
    fault: tuple[str, str] | None = None

    def blob(self) -> memoryview | torch.Tensor:
        assert self.buffer is not None
        if isinstance(self.buffer, torch.Tensor):
            return self.buffer[: self.length]
        return memoryview(self.buffer)[: self.length]


class ServerIO:
    """Routing, batches and faults of a store on Redis servers (mixed into RedisStore).

    The store provides ``topology``, ``url``, ``retry_after``, ``counters``, ``_buffers`` and the
    fault reporting of :class:`~kvcomm.store.base.KVStore` (``_fault``, ``_rearm``).
    """

    topology: Topology
    url: str
    retry_after: float
    counters: Any
    _buffers: BufferPool
    _topology_skip_until: float
    _fault: Callable[[str, str], None]
    _rearm: Callable[..., None]

    # -- faults: per server ----------------------------------------------------------------------
    def _node_fault(self, node: Node, exc: BaseException, what: str) -> tuple[str, str]:
        """Classify an exception of a command on ``node``: the fault kind and its message; a
        connection-level fault marks the node to be skipped for ``retry_after`` seconds."""
        where = f"{what} on {node.name if self.topology.cluster else self.url}"
        if isinstance(exc, AUTH_ERRORS):
            kind, message = "auth", f"{where}: credentials refused: {type(exc).__name__}: {exc}"
        elif isinstance(exc, redis.exceptions.NoPermissionError):
            return "auth", f"{where}: the ACL forbids it: {exc}"
        elif isinstance(exc, redis.TimeoutError):
            kind, message = "timeout", f"{where}: {exc}"
        elif isinstance(exc, redis.ConnectionError):
            kind, message = "unreachable", f"{where}: {exc}"
        elif isinstance(exc, (MovedError, AskError)):
            self.topology.stale()
            return "server_error", f"{where}: the cluster moved the key ({type(exc).__name__}: {exc})"
        else:
            return "server_error", f"{where}: {type(exc).__name__}: {exc}"
        node.degraded = True
        node.skip_until = time.monotonic() + self.retry_after
        self.topology.stale()  # a failover moves the dead primary's slots: read the map again
        return kind, message

    def _node_ok(self, node: Node) -> None:
        if node.degraded:  # recovered: the next outage warns again (once every shard is back)
            node.degraded = False
            if not self.topology.degraded:
                self._rearm("unreachable", "timeout", "auth")

    def _skipped(self, node: Node, what: str) -> tuple[str, str] | None:
        if node.degraded and time.monotonic() < node.skip_until:
            return "unreachable", f"{node.name if self.topology.cluster else self.url} failed moments ago; skipping {what}"
        return None

    def _topology_fault(self, exc: BaseException, what: str) -> None:
        self._topology_skip_until = time.monotonic() + self.retry_after
        self._fault("unreachable", f"{what} on {self.url}: cannot map keys to cluster nodes: {type(exc).__name__}: {exc}")

    def _route(self, full_keys: Sequence[str], what: str) -> dict[Node, list[int]] | None:
        """Indices of ``full_keys`` per node; None (fault counted) if the cluster cannot be mapped."""
        if time.monotonic() < self._topology_skip_until:
            self._fault("unreachable", f"{self.url}: the cluster was unreachable moments ago; skipping {what}")
            return None
        try:
            groups: dict[Node, list[int]] = defaultdict(list)
            for i, full in enumerate(full_keys):
                groups[self.topology.node_for(full)].append(i)
            return groups
        except (TopologyError, redis.RedisError) as exc:
            self._topology_fault(exc, what)
            return None

    def _primaries(self, what: str) -> list[Node]:
        if time.monotonic() < self._topology_skip_until:
            self._fault("unreachable", f"{self.url}: the cluster was unreachable moments ago; skipping {what}")
            return []
        try:
            return self.topology.primaries()
        except (TopologyError, redis.RedisError) as exc:
            self._topology_fault(exc, what)
            return []

    def _run(self, node: Node, what: str, fn: Callable[[redis.Redis], T], default: T, *,
             moved: Any = None) -> T:
        """Run one operation on one node; any Redis error becomes a counted, warned fault -> default.

        ``moved``: a ``MOVED``/``ASK`` reply (the key lives elsewhere now) marks the slot map stale
        and returns this sentinel instead of a fault, so the caller can route the key again.
        """
        skipped = self._skipped(node, what)
        if skipped:
            self._fault(*skipped)
            return default
        try:
            self.counters.round_trip()
            result = fn(node.client)
        except (redis.RedisError, TopologyError) as exc:
            if moved is not None and isinstance(exc, (MovedError, AskError)):
                self.topology.stale()
                return cast(T, moved)
            self._fault(*self._node_fault(node, exc, what))
            return default
        self._node_ok(node)
        return result

    def _on_key(self, full: str, what: str, fn: Callable[[redis.Redis], T], default: T) -> T:
        """:meth:`_run` on the node holding ``full`` (a ``MOVED`` reply: the map is read again, once)."""
        for attempt in (0, 1):
            groups = self._route([full], what)
            if groups is None:
                return default
            # moved again on the second try: a fault like any other (the cluster is resharding)
            result = self._run(next(iter(groups)), what, fn, default, moved=_REROUTE if attempt == 0 else None)
            if result is not _REROUTE:
                return result
        return default

    # -- batches: one pipelined round trip per server, all servers at once --------------------------
    def _exchange(self, work: dict[Node, tuple[list[tuple[Any, ...]], list[Any]]], what: str
                  ) -> dict[Node, list[Reply] | tuple[str, str]]:
        """Send each node its commands (all nodes first), then read every node's replies.

        Returns each node's replies, or the fault (kind, message) that cost it all of them. A
        connection the server dropped is re-dialled once (idempotent commands only come here).
        """
        out: dict[Node, list[Reply] | tuple[str, str]] = {}
        sent: dict[Node, Batch] = {}
        for node, (commands, sinks) in work.items():
            skipped = self._skipped(node, what)
            if skipped:
                out[node] = skipped
                continue
            batch = Batch(node.client, commands, sinks)
            try:
                batch.send()
                sent[node] = batch
            except redis.RedisError as exc:
                out[node] = self._retry_or_fault(node, commands, sinks, exc, what)
        self.counters.round_trip(len(sent))
        for node, batch in sent.items():
            try:
                out[node] = batch.read()
                self._node_ok(node)
            except redis.RedisError as exc:
                out[node] = self._retry_or_fault(node, batch.commands, batch.sinks, exc, what)
        return out

    def _retry_or_fault(self, node: Node, commands: list[tuple[Any, ...]], sinks: list[Any], exc: BaseException,
                        what: str) -> list[Reply] | tuple[str, str]:
        if type(exc) is redis.ConnectionError:  # not a timeout or refused credentials
            try:
                self.counters.round_trip()
                batch = Batch(node.client, commands, sinks)
                batch.send()
                replies = batch.read()
                self._node_ok(node)
                return replies
            except redis.RedisError as again:
                exc = again
        return self._node_fault(node, exc, what)

    def _reply_fault(self, node: Node, reply: Reply, what: str) -> tuple[str, str]:
        where = f"{what} on {node.name if self.topology.cluster else self.url}"
        if reply.error.startswith("NOPERM"):
            return "auth", f"{where}: the ACL forbids it: {reply.error}"
        return "server_error", f"{where}: {reply.error}"

    def _read_values(self, fulls: Sequence[str], caps: Sequence[int], what: str,
                     sink: Callable[[int, int], memoryview | None] | None = None) -> list[Read]:
        """``GETRANGE full 0 cap`` of every key in one batch per server; each value is received into
        ``sink(i, n)`` (default: a pooled buffer, or dropped when longer than its cap). Keys that
        cannot be mapped to a server read as missing (the mapping failure is the one fault counted)."""
        reads = [Read() for _ in fulls]

        def pooled(i: int, n: int) -> memoryview | None:
            if n == 0 or n > caps[i]:
                return None
            buf = self._buffers.take(n)
            reads[i].buffer = buf
            return writable(buf)[:n]

        todo = list(range(len(fulls)))
        for attempt in (0, 1):  # a MOVED or ASK reply: read the slot map again and retry those keys
            groups = self._route([fulls[i] for i in todo], what)
            if groups is None:
                return reads
            work: dict[Node, tuple[list[tuple[Any, ...]], list[Any]]] = {}
            for node, members in groups.items():
                idx = [todo[j] for j in members]
                commands: list[tuple[Any, ...]] = [("GETRANGE", fulls[i], 0, caps[i]) for i in idx]
                sinks = [(lambda n, i=i: (sink or pooled)(i, n)) for i in idx]
                work[node] = (commands, sinks)
            results = self._exchange(work, what)
            retry = []
            for node in work:
                idx = [todo[j] for j in groups[node]]
                result = results[node]
                for pos, i in enumerate(idx):
                    if isinstance(result, tuple):
                        reads[i].fault = result
                        continue
                    reply = result[pos]
                    if reply.kind == "bulk":
                        reads[i].length = reply.length
                    elif reply.kind == "error" and reply.error.startswith(_REDIRECTS):
                        self.topology.stale()
                        reads[i].fault = ("server_error", f"{what}: the cluster moved the key: {reply.error}")
                        retry.append(i)
                    elif reply.kind == "error":
                        reads[i].fault = self._reply_fault(node, reply, what)
            if not retry or attempt:
                break
            for i in retry:
                reads[i] = Read()
            todo = retry
        return reads

    def _unlink(self, fulls: list[str], what: str) -> int:
        """UNLINK keys, one command per key (a cluster may hold them on different shards), best effort."""
        groups = self._route(fulls, what)
        removed = 0
        for node, idx in (groups or {}).items():
            def run(client: redis.Redis, idx: list[int] = idx) -> int:
                pipe = client.pipeline(transaction=False)
                for i in idx:
                    pipe.unlink(fulls[i])
                return sum(int(n) for n in pipe.execute(raise_on_error=False) if isinstance(n, int))
            removed += self._run(node, what, run, 0)
        return removed

    def _scan_node(self, node: Node, pattern: str) -> list[bytes]:
        none: list[bytes] = []
        return self._run(node, "SCAN", lambda c: list(c.scan_iter(match=pattern, count=_SCAN_COUNT)), none)

    def _unlink_on(self, node: Node, names: list[str], what: str) -> list[bool]:
        def run(client: redis.Redis) -> list[bool]:
            out: list[bool] = []
            for i in range(0, len(names), 500):
                pipe = client.pipeline(transaction=False)
                for name in names[i : i + 500]:
                    pipe.unlink(name)
                out += [n == 1 for n in pipe.execute(raise_on_error=False)]
            return out

        return self._run(node, what, run, [False] * len(names)) if names else []


def url_user(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).username or None
    except ValueError:
        return None


def node_usage(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """One server's share of a namespace (SCAN, TYPE, STRLEN and the first bytes of each string)."""
    keys = list(client.scan_iter(match=glob_escape(prefix) + "*", count=_SCAN_COUNT))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
    types = pipe.execute()
    strings = [k for k, t in zip(keys, types, strict=True) if t == b"string"]
    for k in strings:
        pipe.strlen(k)
        pipe.getrange(k, 0, chunks.MANIFEST_MAX_BYTES - 1)  # magic, version, flags; a manifest whole
    out = pipe.execute()
    n = len(prefix)
    heads, sizes = out[1::2], out[0::2]
    is_chunk = [is_chunk_key(k.decode("utf-8", "replace")[n:]) for k in strings]
    entry_heads = []
    for head, chunk in zip(heads, is_chunk, strict=True):
        if chunk:
            continue
        if chunks.is_manifest(head):
            try:
                head = chunks.parse(head, max_total=1 << 62).head
            except EntryFormatError:
                continue
        entry_heads.append(head)
    row: dict[str, Any] = {
        "keys": len(keys) - sum(is_chunk),
        "entries": len(entry_heads),
        "entry_bytes": sum(sizes),
        "chunks": sum(is_chunk),
        "signed_entries": sum(map(is_signed, entry_heads)),
        "unsigned_entries": sum(h[:4] == MAGIC and not is_signed(h) for h in entry_heads),
    }
    try:
        memory = client.info("memory")
        row.update(used_memory=memory.get("used_memory"), maxmemory=memory.get("maxmemory"),
                   maxmemory_policy=memory.get("maxmemory_policy"))
    except redis.RedisError:  # INFO may be forbidden to a namespace's ACL user: the counts still stand
        pass
    return row
