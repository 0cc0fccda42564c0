"""Pipelined reads straight from a Redis connection's socket into memory the caller chose.

redis-py (with or without hiredis) turns every bulk reply into a new ``bytes`` object: the value is
copied from the socket into the parser's buffer, from there into the object, and the store then
copied it once more into tensors. Here a batch of commands is written with one ``sendall`` and
each bulk reply (``$<n>\\r\\n<n bytes>\\r\\n``) is received with ``recv_into`` directly into a
destination the caller picks once it knows ``n`` (a pooled buffer, a slice of a larger entry, a
pinned tensor): one copy, by the kernel. Connections, credentials, TLS and the connection pool
stay redis-py's; only the replies of these batches are read here, completely, so a connection goes
back to its pool as clean as it came (on any error it is disconnected instead).

Only what kvcomm's batches get back is understood: bulk strings, nil, errors, integers, simple
strings and flat arrays or maps of those (``HGETALL``), in RESP2 or RESP3; RESP3 push messages
(``>``) and attributes (``|``) between replies are skipped. Anything else is a protocol error.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

#: bytes read into the reader's own buffer at a time (reply headers and small replies)
SCRATCH_BYTES = 1 << 16
_MAX_LINE = 1 << 16

#: where a bulk reply of n bytes goes: a writable memoryview of exactly n bytes, or None to drop it
Sink = Callable[[int], "memoryview | None"]


@dataclass
class Reply:
    """One reply: a bulk string (``data``: a view of where it went; None when dropped), nil, an
    error (``error``: the server's message) or a small value (``value``: an int, a str, or for an
    array a list of bytes / int / None)."""

    kind: str  # "bulk" | "nil" | "error" | "value"
    length: int = 0
    data: memoryview | None = None
    error: str = ""
    value: Any = None


def _keep(n: int) -> memoryview:
    return memoryview(bytearray(n))


class SocketReader:
    """RESP replies from one socket: headers through a small buffer, bulk payloads straight to their sinks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(SCRATCH_BYTES)
        self.start = self.end = 0

    @property
    def pending(self) -> int:
        """Bytes received but not consumed (0 after a complete batch)."""
        return self.end - self.start

    def _recv_into(self, dest: memoryview) -> int:
        try:
            n = self.sock.recv_into(dest, len(dest))
        except TimeoutError:  # socket.timeout
            raise redis.TimeoutError("Timeout reading from socket") from None
        except OSError as exc:
            raise redis.ConnectionError(f"Error while reading from socket: {exc}") from None
        if n == 0:
            raise redis.ConnectionError("Connection closed by server.")
        return n

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            self.buf[: self.end - self.start] = self.buf[self.start : self.end]
            self.start, self.end = 0, self.end - self.start
        self.end += self._recv_into(memoryview(self.buf)[self.end :])

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.start, self.end)
            if i >= 0:
                line = bytes(self.buf[self.start : i])
                self.start = i + 2
                return line
            if self.end - self.start >= _MAX_LINE:
                raise redis.exceptions.InvalidResponse("reply line too long")
            self._fill()

    def _into(self, dest: memoryview) -> None:
        """Fill ``dest``: bytes already buffered first, the rest straight from the socket."""
        n = len(dest)
        have = min(n, self.end - self.start)
        if have:
            dest[:have] = self.buf[self.start : self.start + have]
            self.start += have
        got = have
        while got < n:
            got += self._recv_into(dest[got:])

    def _skip(self, n: int) -> None:
        while n:
            if self.start == self.end:
                self._fill()
            k = min(n, self.end - self.start)
            self.start += k
            n -= k

    def read(self, sink: Sink | None = None) -> Reply:
        """The next reply; a bulk payload of n bytes goes to ``sink(n)`` (dropped if it gives None)."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = _int(rest)
            if n < 0:
                return Reply("nil")
            dest = sink(n) if sink is not None else None
            if dest is None:
                self._skip(n + 2)
            else:
                if len(dest) != n:
                    raise ValueError(f"sink gave {len(dest)} bytes for a reply of {n}")
                self._into(dest)
                self._skip(2)  # the payload's \r\n
            return Reply("bulk", n, dest)
        if kind == b"-":
            return Reply("error", error=rest.decode("utf-8", "replace"))
        if kind == b":":
            return Reply("value", value=_int(rest))
        if kind == b"+":
            return Reply("value", value=rest.decode("utf-8", "replace"))
        if kind == b"_":
            return Reply("nil")
        if kind in (b"*", b"~", b"%", b">", b"|"):  # array, set, map (2n items), push, attribute
            n = _int(rest) * (2 if kind in (b"%", b"|") else 1)
            if n < 0:
                return Reply("nil")
            items = [self.read(_keep) for _ in range(n)]
            if kind in (b">", b"|"):  # out-of-band: not the reply to a command of the batch
                return self.read(sink)
            if any(item.kind not in ("bulk", "nil", "value") or isinstance(item.value, list) for item in items):
                raise redis.exceptions.InvalidResponse("nested or error element in an array reply")
            return Reply("value", value=[bytes(i.data) if i.data is not None else i.value for i in items])
        if kind in (b"#", b",", b"("):  # boolean, double, big number
            return Reply("value", value=rest.decode("utf-8", "replace"))
        if kind == b"!":  # blob error
            n = _int(rest)
            message = bytearray(n)
            self._into(memoryview(message))
            self._skip(2)
            return Reply("error", error=message.decode("utf-8", "replace"))
        raise redis.exceptions.InvalidResponse(f"unexpected reply type {kind!r} in a kvcomm batch")


def _int(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise redis.exceptions.InvalidResponse(f"bad length or integer {text[:32]!r} in a reply") from None


def raw_capable(client: redis.Redis) -> bool:
    """Whether this client's connections can be read here (not with a client-side cache, whose
    invalidation messages redis-py must see)."""
    return getattr(client.connection_pool, "cache", None) is None


class Batch:
    """Commands for one server, written at once; their replies read later, in order.

    ``send()`` takes a connection from the client's pool and writes every command; ``read()``
    reads every reply (bulk payloads into ``sinks[i]``) and returns the connection. Between the
    two the caller may send batches to other servers, so that all of them work at once. A client
    whose replies cannot be read here (client-side caching) runs the batch as a redis-py pipeline
    in ``read()`` instead, and its bulk replies are copied into the sinks.
    """

    def __init__(self, client: redis.Redis, commands: Sequence[tuple[Any, ...]], sinks: Sequence[Sink | None]) -> None:
        self.client = client
        self.commands = list(commands)
        self.sinks = list(sinks)
        self.conn: Any = None
        self.raw = raw_capable(client)

    def send(self) -> None:
        if not self.raw:
            return
        pool = self.client.connection_pool
        self.conn = pool.get_connection()
        try:
            self.conn.send_packed_command(self.conn.pack_commands(self.commands))
        except BaseException:
            self._drop()
            raise

    def read(self) -> list[Reply]:
        if not self.raw:
            return self._pipeline()
        try:
            reader = SocketReader(self.conn._sock)
            replies = [reader.read(sink) for sink in self.sinks]
            if reader.pending:
                raise redis.exceptions.InvalidResponse(f"{reader.pending} bytes after the last reply")
        except BaseException:
            self._drop()
            raise
        self.client.connection_pool.release(self.conn)
        self.conn = None
        return replies

    def _pipeline(self) -> list[Reply]:
        pipe = self.client.pipeline(transaction=False)
        for command in self.commands:
            pipe.execute_command(*command)
        return [_as_reply(value, sink) for value, sink in zip(pipe.execute(raise_on_error=False), self.sinks, strict=True)]

    def _drop(self) -> None:
        """Disconnect (its replies may be half read) and give the connection back."""
        if self.conn is not None:
            self.conn.disconnect()
            self.client.connection_pool.release(self.conn)
            self.conn = None


def _as_reply(value: Any, sink: Sink | None) -> Reply:
    """A reply parsed by redis-py, as :meth:`SocketReader.read` would have given it."""
    if isinstance(value, redis.ConnectionError | redis.TimeoutError):
        raise value
    if isinstance(value, Exception):
        return Reply("error", error=str(value))
    if value is None:
        return Reply("nil")
    if isinstance(value, bytes | bytearray | memoryview):
        dest = sink(len(value)) if sink is not None else None
        if dest is not None:
            dest[:] = value
        return Reply("bulk", len(value), dest)
    if isinstance(value, dict):  # HGETALL, through redis-py's callback
        return Reply("value", value=[x for kv in value.items() for x in kv])
    return Reply("value", value=value)


__all__ = ["Batch", "Reply", "SocketReader", "Sink", "raw_capable"]
