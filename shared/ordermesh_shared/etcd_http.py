"""How :class:`~ordermesh_shared.etcd_client.EtcdClient` reaches etcd's JSON gateway.

Two implementations of one small port, :class:`EtcdHttp` (a bounded POST, a streamed POST):

* :class:`AiohttpEtcdHttp`, the default: one ``aiohttp.ClientSession``, the engine the rest
  of the platform uses. Measured by ``bench/etcd_client.py``: a call costs its caller
  1.0-1.1x the CPU of a bare aiohttp POST of the same bytes, where httpx cost 3.3-3.5x (one
  call at a time) to 14x (16 at once).
* :class:`HttpxEtcdHttp`: any httpx transport, which is how tests script a gateway
  (``httpx.MockTransport``) without a network.

Both report the same way: a library error becomes :class:`HttpFailure` (``unreachable``:
etcd was not reached, or the connection broke), never an aiohttp or httpx exception, and the
client turns it into its own errors; running out of the caller's time stays a
``TimeoutError``, which the client names (an unanswered call, or a wait that took too long).

(Why not :class:`~ordermesh_shared.resilience.transport.AiohttpEngine` itself: it reads whole
answers under one total time limit, while etcd's watches and elections stream, and its locks
and campaigns wait without a limit while connecting keeps one.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx

OK = 200
_JSON = {"Content-Type": "application/json"}
_POOL_SIZE = 100  # as httpx's default: waiting locks and campaigns each hold a connection


class HttpFailure(Exception):
    """A request failed below HTTP; ``unreachable`` when etcd was not reached or the
    connection broke (try again later), else the request or answer was at fault."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True, slots=True)
class Streamed:
    """A streaming answer: its status, and its body as it arrives, chunk by chunk."""

    status: int
    chunks: AsyncIterator[bytes]

    async def read(self) -> bytes:
        """The rest of the body (for an error answer, which does not stream)."""
        return b"".join([chunk async for chunk in self.chunks])


class EtcdHttp(Protocol):
    """POSTs to the gateway; an async context manager that owns its connections."""

    async def __aenter__(self) -> EtcdHttp: ...

    async def aclose(self) -> None: ...

    async def post(self, path: str, body: bytes, *, limit: float | None) -> tuple[int, bytes]:
        """Status and whole body within ``limit`` seconds (None: no limit), or TimeoutError."""
        ...

    def stream(self, path: str, body: bytes) -> AbstractAsyncContextManager[Streamed]:
        """The answer as it streams; the connection is closed when the block is left."""
        ...


class AiohttpEtcdHttp:
    """The gateway over one aiohttp session (pooled keep-alive connections).

    >>> async with AiohttpEtcdHttp("http://127.0.0.1:2379", connect_timeout=2.0) as http:
    ...     status, body = await http.post("/v3/kv/range", b'{"key": "YQ=="}', limit=2.0)
    """

    def __init__(self, url: str, *, connect_timeout: float) -> None:
        self.url = url
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._timeout_of_limit = aiohttp.ClientTimeout(
            total=connect_timeout, connect=connect_timeout
        )

    async def __aenter__(self) -> AiohttpEtcdHttp:
        # Created here, not in __init__: an aiohttp session belongs to a running loop.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_POOL_SIZE), raise_for_status=False
        )
        return self

    async def aclose(self) -> None:
        """Close the connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, path: str, body: bytes, *, limit: float | None) -> tuple[int, bytes]:
        """Status and whole body within ``limit`` seconds, or TimeoutError."""
        # aiohttp's own total timeout: its timer is scheduled anyway, so it costs less than an
        # asyncio.timeout around the call (measured in resilience/transport.py's engine).
        request = self._open().post(
            self.url + path, data=body, headers=_JSON, timeout=self._timeout(limit)
        )
        try:
            async with request as answer:
                return answer.status, await answer.read()
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: etcd not reached
            raise unreachable(self.url, path, exc) from exc
        except TimeoutError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise _failed(self.url, path, exc) from exc

    @asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[Streamed]:
        """The answer as it streams (no time limit but connecting's: the caller bounds it)."""
        try:
            request = self._open().post(
                self.url + path, data=body, headers=_JSON, timeout=self._timeout(None)
            )
            async with request as answer:
                yield Streamed(answer.status, answer.content.iter_any())
        except aiohttp.ConnectionTimeoutError as exc:
            raise unreachable(self.url, path, exc) from exc
        except TimeoutError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise _failed(self.url, path, exc) from exc

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use EtcdClient as 'async with EtcdClient(url) as etcd: ...'")
        return self._session

    def _timeout(self, limit: float | None) -> aiohttp.ClientTimeout:
        # Connecting (a pool slot included) is always bounded, so an absent etcd fails fast
        # even for a call that may wait forever for an answer. Most calls use the client's
        # default limit: the last object is reused.
        if self._timeout_of_limit.total != limit:
            self._timeout_of_limit = aiohttp.ClientTimeout(
                total=limit, connect=self._connect_timeout
            )
        return self._timeout_of_limit


class HttpxEtcdHttp:
    """The gateway over an httpx transport (tests: ``httpx.MockTransport``).

    >>> async with HttpxEtcdHttp("http://etcd.test", transport=mock, connect_timeout=2.0) as h:
    ...     status, body = await h.post("/v3/kv/range", b'{"key": "YQ=="}', limit=2.0)
    """

    def __init__(
        self, url: str, *, transport: httpx.AsyncBaseTransport, connect_timeout: float
    ) -> None:
        self.url = url
        # Reads may legitimately wait long (a queued lock, a quiet watch): the caller bounds
        # them. Connecting may not: an absent etcd fails fast.
        timeout = httpx.Timeout(connect_timeout, read=None)
        self._client = httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> HttpxEtcdHttp:
        return self

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def post(self, path: str, body: bytes, *, limit: float | None) -> tuple[int, bytes]:
        """Status and whole body within ``limit`` seconds, or TimeoutError."""
        try:
            async with asyncio.timeout(limit):
                answer = await self._client.post(path, content=body)
        except httpx.HTTPError as exc:
            raise _failed(self.url, path, exc) from exc
        return answer.status_code, answer.content

    @asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[Streamed]:
        """The answer as it streams (no time limit but connecting's: the caller bounds it)."""
        try:
            async with self._client.stream("POST", path, content=body) as answer:
                yield Streamed(answer.status_code, answer.aiter_bytes())
        except httpx.HTTPError as exc:
            raise _failed(self.url, path, exc) from exc


async def lines(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The non-blank lines of a streamed body (one JSON message each), however it was cut."""
    # Not aiohttp's readline: it gives up on lines over 128 KiB, and one watch message can
    # carry values up to etcd's request limit (1.5 MiB by default).
    pending = b""
    async for chunk in chunks:
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def unreachable(url: str, path: str, exc: BaseException) -> HttpFailure:
    """etcd was not reached, or the connection to it broke."""
    return HttpFailure(
        f"cannot reach etcd at {url} ({path}: {type(exc).__name__}: "
        f"{exc or 'no details'}); check that etcd is running and the URL and port are right",
        unreachable=True,
    )


# Connection-level failures, and a body that broke off mid-way: etcd is (for now) out of
# reach. Anything else is a request this client got wrong, or an answer it cannot read.
_UNREACHABLE = (
    httpx.TransportError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    OSError,
)


def _failed(url: str, path: str, exc: BaseException) -> HttpFailure:
    if isinstance(exc, _UNREACHABLE):
        return unreachable(url, path, exc)
    message = f"etcd at {url}: {path} failed: {type(exc).__name__}: {exc}"
    return HttpFailure(message, unreachable=False)
