"""Serve an in-process app over real HTTP on a loopback port, for tests whose services must
call each other through the real ServiceClient (aiohttp, real sockets).

>>> with loopback_socket() as sock:                         # bound before the app learns it
...     settings = PaymentSettings(port=sock.getsockname()[1], ...)
...     async with running(spec, settings, registry) as client, serving(client, sock):
...         ...                                             # registered, answering on the port
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import uvicorn


@contextlib.contextmanager
def loopback_socket() -> Iterator[socket.socket]:
    """A listening socket on a free loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


class _InTestServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # pytest owns SIGINT; a server inside a test must not take it over


@asynccontextmanager
async def serving(client: httpx.AsyncClient, sock: socket.socket) -> AsyncIterator[None]:
    """Serve the app behind ``client`` (from ``tests.support.apps.running``, its lifespan
    already running) on ``sock``."""
    transport: httpx.ASGITransport = client.app_transport  # type: ignore[attr-defined]
    config = uvicorn.Config(
        transport.app, lifespan="off", log_config=None, log_level="warning", access_log=False
    )
    server = _InTestServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="test-http")
    try:
        yield
    finally:
        server.should_exit = True
        await task
