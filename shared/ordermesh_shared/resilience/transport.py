"""The HTTP engines behind :class:`~ordermesh_shared.resilience.ServiceClient`.

The client's API is ours, so the engine is swappable. :class:`AiohttpEngine` (the default)
is one shared ``aiohttp.ClientSession`` with keep-alive pooling: measured by
``bench/client_cpu.py``, it is the only engine that keeps the client within 1.3x the CPU per
call of raw aiohttp. :class:`HttpxEngine` wraps an ``httpx.AsyncClient``: slower on the wire,
but with ``httpx.ASGITransport`` it calls an app in-process, which tests like.

An engine bounds each request by the ``time_limit`` it is given (the attempt's share of the
deadline), in whatever way is cheapest for it, and reports failures as :class:`EngineError`
only, saying whether the request may have reached the callee (``sent``: only an unsent
request is safe to resend when it is not idempotent) and whether time ran out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

import aiohttp
import httpx
import orjson


class EngineError(Exception):
    """The request failed below HTTP; ``sent`` is False only when it surely never left."""

    def __init__(self, message: str, *, sent: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.timed_out = timed_out


class UpstreamResponse:
    """An answer: ``status``, ``headers`` (case-insensitive), ``content``, ``json()``, ``text``."""

    __slots__ = ("content", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status = status
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        """The body decoded as JSON."""
        return orjson.loads(self.content)

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.content.decode(errors="replace")

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {len(self.content)} bytes>"


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
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        time_limit: float,
    ) -> UpstreamResponse:
        """The whole answer within ``time_limit`` seconds, or EngineError."""
        ...


class AiohttpEngine:
    """One ``aiohttp.ClientSession`` for every call of the process (connection pooling).

    >>> async with AiohttpEngine(pool_size=100) as engine:
    ...     answer = await engine.send("GET", "http://127.0.0.1:8002/customers", headers={},
    ...                                body=None, time_limit=3.0)

    The time limit is aiohttp's ``total`` timeout (connect, send, read the whole body):
    aiohttp schedules that timer anyway, so it costs less than an ``asyncio.timeout`` around
    the call. aiohttp rounds timeouts above 5 s up to a whole second of the loop clock.
    """

    def __init__(
        self, *, pool_size: int = 100, trace_configs: Sequence[aiohttp.TraceConfig] = ()
    ) -> None:
        """``trace_configs``: aiohttp request hooks, e.g. the OpenTelemetry client spans of
        :meth:`ordermesh_shared.tracing.Tracing.client_trace_configs` (none: tracing off)."""
        self._pool_size = pool_size
        self._trace_configs = list(trace_configs)
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout()

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._pool_size),
            raise_for_status=False,
            trace_configs=self._trace_configs or None,
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
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        time_limit: float,
    ) -> UpstreamResponse:
        if self._session is None:
            raise RuntimeError("AiohttpEngine used outside its 'async with' block")
        request = self._session.request(
            method, url, headers=headers, data=body, timeout=self._timeout_of(time_limit)
        )
        try:
            async with request as answer:
                payload = await answer.read()
                return UpstreamResponse(answer.status, answer.headers, payload)
        except TimeoutError as exc:  # before OSError, its base class
            raise _timed_out(time_limit) from exc
        except aiohttp.ClientConnectorError as exc:
            raise EngineError(f"cannot connect: {exc}", sent=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineError(f"{type(exc).__name__}: {exc}", sent=True) from exc

    def _timeout_of(self, seconds: float) -> aiohttp.ClientTimeout:
        # Most attempts use the same timeout (the policy's): reuse the object.
        if self._timeout.total != seconds:
            self._timeout = aiohttp.ClientTimeout(total=seconds)
        return self._timeout


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
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        time_limit: float,
    ) -> UpstreamResponse:
        # httpx's own timeouts are per phase, not for the whole exchange: bound it ourselves.
        try:
            async with asyncio.timeout(time_limit):
                answer = await self._client.request(method, url, headers=headers, content=body)
        except TimeoutError as exc:
            raise _timed_out(time_limit) from exc
        except httpx.ConnectError as exc:
            raise EngineError(f"cannot connect: {exc}", sent=False) from exc
        except httpx.TransportError as exc:
            raise EngineError(f"{type(exc).__name__}: {exc}", sent=True) from exc
        return UpstreamResponse(answer.status_code, answer.headers, answer.content)


def _timed_out(time_limit: float) -> EngineError:
    return EngineError(f"no answer within {time_limit:.3f} s", sent=True, timed_out=True)
