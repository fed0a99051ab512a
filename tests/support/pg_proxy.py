"""A TCP proxy in front of the test Postgres that can play a server restarting.

``forward``: bytes pass both ways. ``starting``: every open connection is cut and every new
one gets the answer Postgres gives while it starts up (FATAL 57P03, asyncpg's
``CannotConnectNowError``). ``refusing``: the port is closed (connection refused).

>>> async with PgProxy(dsn) as proxy:
...     settings = Settings(database_url=proxy.dsn)   # the service goes through the proxy
...     proxy.play_starting_up()

:class:`CountingPgProxy` also counts the round trips that pass (:class:`WireCounter` reads
the client's side of the wire protocol): a budget test's measure of one request's cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Mode = Literal["forward", "starting", "refusing"]
_SSL_REQUEST = 80877103


class PgProxy:
    """Forward 127.0.0.1:<ephemeral> to the Postgres of ``dsn`` until told otherwise."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._dsn_parts = parts
        self._server: asyncio.Server | None = None
        self._port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.mode: Mode = "forward"

    @property
    def dsn(self) -> str:
        """The DSN of ``dsn``'s database, through the proxy."""
        parts = self._dsn_parts
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self._port}" if userinfo else f"127.0.0.1:{self._port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def __aenter__(self) -> PgProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cut_all()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def play_starting_up(self) -> None:
        """Cut every connection; new ones are told the database system is starting up."""
        self.mode = "starting"
        self._cut_all()

    async def refuse(self) -> None:
        """Cut every connection and close the port."""
        self.mode = "refusing"
        self._cut_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            if self.mode == "forward":
                await self._forward(reader, writer)
            else:
                await _answer_starting_up(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers.add(up_writer)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(reader, up_writer))
                group.create_task(_pipe(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            up_writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


async def _answer_starting_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    length, code = struct.unpack("!ii", await reader.readexactly(8))
    await reader.readexactly(length - 8)
    if code == _SSL_REQUEST:  # no TLS here; the client goes on with its startup message
        writer.write(b"N")
        length, _ = struct.unpack("!ii", await reader.readexactly(8))
        await reader.readexactly(length - 8)
    fields = b"".join(
        kind + text + b"\x00"
        for kind, text in (
            (b"S", b"FATAL"),
            (b"V", b"FATAL"),
            (b"C", b"57P03"),
            (b"M", b"the database system is starting up"),
        )
    )
    body = fields + b"\x00"
    writer.write(b"E" + struct.pack("!i", len(body) + 4) + body)
    await writer.drain()


# -- counting round trips ------------------------------------------------------------------

_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_PREAMBLE_CODES = (_SSL_REQUEST, _GSSENC_REQUEST)  # the client sends its startup next
# asyncpg's type introspection on a statement-cache miss (asyncpg/introspection.py).
_INTROSPECTION_MARKS = ("typeinfo_tree", "set_config('jit'")


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """One time a client sent the server something and waited for the answer.

    ``kind``: ``query`` (a simple Query), ``execute`` (an extended-protocol batch that runs a
    statement: Bind/Execute/Sync, with Parse first on a statement-cache miss), ``prepare``
    (Parse/Describe and Flush or Sync, nothing executed: asyncpg preparing a statement it had
    not cached), ``function`` (a FunctionCall), ``other`` (Close, or a bare Sync).
    ``sql``: the statement's text (a cached statement's from the Parse that named it).
    """

    kind: str
    sql: str

    @property
    def cache_miss(self) -> bool:
        """Work asyncpg does only on a connection that has not run this statement before:
        preparing it, and looking up the types it uses (the introspection query, run with
        JIT switched off and back on)."""
        return self.kind == "prepare" or any(mark in self.sql for mark in _INTROSPECTION_MARKS)


class WireCounter:
    """Reads the frontend (client to server) messages of one PostgreSQL connection and
    calls ``on_round_trip`` for each round trip, as the bytes go past.

    A simple Query is one round trip; an extended-protocol batch is one, ending at Sync,
    or at a Flush the client then waits on (asyncpg prepares with Parse/Describe/Flush).
    Authentication messages are not round trips of a query (``auth_messages`` counts them).

    >>> counter = WireCounter(trips.append)
    >>> counter.feed(startup_packet + query_message)   # in any slicing
    >>> trips  # [RoundTrip(kind='query', sql='SELECT 1')]
    """

    def __init__(self, on_round_trip: Callable[[RoundTrip], None]) -> None:
        self._on_round_trip = on_round_trip
        self._buffer = bytearray()
        self._started = False  # past the startup packet: typed messages from here on
        self._statements: dict[str, str] = {}  # prepared statement name -> SQL, per session
        self._batch: list[tuple[bytes, str]] = []  # extended-protocol messages since Sync
        self.auth_messages = 0

    def feed(self, data: bytes) -> None:
        """Take the next bytes the client sent (a message may span calls)."""
        self._buffer += data
        while (message := self._next_message()) is not None:
            kind, body = message
            if kind == b"":
                self._on_startup(body)
            else:
                self._on_message(kind, body)

    def _next_message(self) -> tuple[bytes, bytes] | None:
        # The startup packet (and SSLRequest before it) has no type byte: length, then body.
        header = 4 if not self._started else 5
        if len(self._buffer) < header:
            return None
        kind = b"" if not self._started else bytes(self._buffer[:1])
        (length,) = struct.unpack("!i", self._buffer[header - 4 : header])
        end = header - 4 + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[header:end])
        del self._buffer[:end]
        return kind, body

    def _on_startup(self, body: bytes) -> None:
        (code,) = struct.unpack("!i", body[:4])
        # After an SSL/GSS request (answered "no") the startup packet follows, untyped too.
        self._started = code not in _PREAMBLE_CODES and code != _CANCEL_REQUEST

    def _on_message(self, kind: bytes, body: bytes) -> None:
        if kind == b"Q":
            self._on_round_trip(RoundTrip("query", _cstring(body)))
        elif kind == b"F":
            self._on_round_trip(RoundTrip("function", ""))
        elif kind == b"p":
            self.auth_messages += 1
        elif kind == b"S" or (kind == b"H" and self._batch):
            self._end_batch()
        elif kind in (b"P", b"B", b"E", b"D", b"C"):
            self._batch.append((kind, self._statement_of(kind, body)))

    def _statement_of(self, kind: bytes, body: bytes) -> str:
        if kind == b"P":  # name, query
            name, _, rest = body.partition(b"\x00")
            sql = _cstring(rest)
            self._statements[name.decode()] = sql
            return sql
        if kind == b"B":  # portal, statement
            statement = body.split(b"\x00", 2)[1].decode()
            return self._statements.get(statement, f"<statement {statement!r}>")
        return ""

    def _end_batch(self) -> None:
        kinds = {kind for kind, _ in self._batch}
        if b"E" in kinds:
            trip = "execute"
            texts = [sql for kind, sql in self._batch if kind == b"B"]
        elif b"P" in kinds:
            trip = "prepare"
            texts = [sql for kind, sql in self._batch if kind == b"P"]
        else:
            trip, texts = "other", []
        self._batch.clear()
        self._on_round_trip(RoundTrip(trip, "; ".join(dict.fromkeys(texts))))


def _cstring(data: bytes) -> str:
    return data.partition(b"\x00")[0].decode(errors="replace")


class CountingPgProxy(PgProxy):
    """A :class:`PgProxy` that counts the round trips its clients make (``round_trips``,
    ``trips`` with their SQL, since ``reset_counts()``) and the connections they open.

    It answers a client's SSLRequest itself with "no TLS", so what passes stays readable.

    >>> async with CountingPgProxy(dsn) as proxy:
    ...     settings = Settings(database_url=proxy.dsn)
    ...     proxy.reset_counts(); await place_one_order(); print(proxy.round_trips)
    """

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._trips: list[RoundTrip] = []
        self.connections = 0  # opened since the last reset

    @property
    def round_trips(self) -> int:
        """Round trips since the last :meth:`reset_counts` (all connections together)."""
        return len(self._trips)

    @property
    def trips(self) -> tuple[RoundTrip, ...]:
        """What each of those round trips was, in the order the clients sent them."""
        return tuple(self._trips)

    def by_kind(self) -> Counter[str]:
        """Those round trips counted by kind (``query``, ``execute``, ``prepare``...)."""
        return Counter(trip.kind for trip in self._trips)

    def reset_counts(self) -> None:
        """Count from zero again (round trips and connections)."""
        self._trips.clear()
        self.connections = 0

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counter = WireCounter(self._trips.append)
        startup = await _startup_refusing_tls(reader, writer)
        counter.feed(startup)
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers.add(up_writer)
        try:
            up_writer.write(startup)
            async with asyncio.TaskGroup() as group:
                group.create_task(_tapped_pipe(reader, up_writer, counter.feed))
                group.create_task(_pipe(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            up_writer.transport.abort()


async def _startup_refusing_tls(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bytes:
    """The client's startup packet, after answering "N" to any SSL/GSS encryption request."""
    while True:
        head = await reader.readexactly(8)
        length, code = struct.unpack("!ii", head)
        packet = head + await reader.readexactly(length - 8)
        if code not in _PREAMBLE_CODES:
            return packet
        writer.write(b"N")
        await writer.drain()


async def _tapped_pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap: Callable[[bytes], None]
) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            tap(data)  # before forwarding: counted by the time the server can answer
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
