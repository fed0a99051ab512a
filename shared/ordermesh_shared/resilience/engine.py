"""The HTTP engines behind :class:`~ordermesh_shared.resilience.ServiceClient`.

The client's API is ours, so the engine is swappable. :class:`AiohttpEngine` (the default)
is one shared ``aiohttp.ClientSession`` with keep-alive pooling: measured by
``bench/client_cpu.py``, it is the only engine that keeps the client within 1.3x the CPU per
call of raw aiohttp. :class:`HttpxEngine` wraps an ``httpx.AsyncClient``: slower on the wire,
but with ``httpx.ASGITransport`` it calls an app in-process, which tests like.

An engine reports failures as :class:`EngineError` only, saying whether the request may have
reached the callee (``sent``): only an unsent request is safe to resend when it is not
idempotent. Timeouts are not the engine's business: the client cancels the attempt.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Protocol, Self

import aiohttp
import httpx


class EngineError(Exception):
    """The request failed below HTTP; ``sent`` is False only when it surely never left."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class RawResponse:
    """Status, headers and the whole body of an answer."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Engine(Protocol):
    """Sends one request and reads the whole answer; an async context manager."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None
    ) -> RawResponse:
        """The answer, or EngineError."""
        ...


class AiohttpEngine:
    """One ``aiohttp.ClientSession`` for every call of the process (connection pooling).

    >>> async with AiohttpEngine(pool_size=100) as engine:
    ...     answer = await engine.send("GET", "http://127.0.0.1:8002/customers", headers={},
    ...                                body=None)
    """

    def __init__(self, *, pool_size: int = 100) -> None:
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        # No aiohttp timeouts: the client bounds each attempt with asyncio.timeout, which is
        # cheaper than aiohttp's per-request timers and covers the whole attempt.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._pool_size, use_dns_cache=True),
            timeout=aiohttp.ClientTimeout(),
            raise_for_status=False,
            auto_decompress=True,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None
    ) -> RawResponse:
        if self._session is None:
            raise RuntimeError("AiohttpEngine used outside its 'async with' block")
        try:
            async with self._session.request(method, url, headers=headers, data=body) as answer:
                payload = await answer.read()
                return RawResponse(answer.status, answer.headers, payload)
        except aiohttp.ClientConnectorError as exc:
            raise EngineError(f"cannot connect: {exc}", sent=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineError(f"{type(exc).__name__}: {exc}", sent=True) from exc


class HttpxEngine:
    """An ``httpx.AsyncClient`` as the engine (any httpx transport, e.g. ASGITransport).

    >>> transport = httpx.ASGITransport(app=payment_app)          # in-process calls
    >>> async with ServiceClient(registry, engine=HttpxEngine(transport=transport)) as clients:
    ...     await clients.payment.get("/customers")
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._owned = client is None
        self._client = client or httpx.AsyncClient(transport=transport, timeout=None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owned:
            await self._client.aclose()

    async def send(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None
    ) -> RawResponse:
        try:
            answer = await self._client.request(method, url, headers=headers, content=body)
        except httpx.ConnectError as exc:
            raise EngineError(f"cannot connect: {exc}", sent=False) from exc
        except httpx.TransportError as exc:
            raise EngineError(f"{type(exc).__name__}: {exc}", sent=True) from exc
        return RawResponse(answer.status_code, answer.headers, answer.content)
