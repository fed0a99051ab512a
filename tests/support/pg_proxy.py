"""A TCP proxy in front of the test Postgres that can play a server restarting.

``forward``: bytes pass both ways. ``starting``: every open connection is cut and every new
one gets the answer Postgres gives while it starts up (FATAL 57P03, asyncpg's
``CannotConnectNowError``). ``refusing``: the port is closed (connection refused).

>>> async with PgProxy(dsn) as proxy:
...     settings = Settings(database_url=proxy.dsn)   # the service goes through the proxy
...     proxy.play_starting_up()
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
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
