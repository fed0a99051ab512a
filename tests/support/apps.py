"""Run a service app in-process for tests: real Postgres and RabbitMQ, a fake registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from ordermesh_shared.auth import TOKEN_TTL, ServiceTokens
from ordermesh_shared.bootstrap import ServiceContext, ServiceSpec, create_service_app
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.tracing import Tracing
from pydantic import SecretStr

from tests.support.fakes import InMemoryRegistry


@asynccontextmanager
async def running(
    spec: ServiceSpec,
    settings: ServiceSettings,
    registry: InMemoryRegistry | None = None,
    *,
    caller: str | None = "order",
    tracing: Tracing | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an httpx client wired to it in-process that
    calls as the service ``caller`` (with its token; None: anonymously); ``tracing``: where
    its spans go (by default as its settings say: off)."""
    fake = registry or InMemoryRegistry()
    app = create_service_app(spec, settings, registry_factory=lambda _s: fake, tracing=tracing)
    secret = settings.service_token_secret
    headers = {} if caller is None else bearer(secret, audience=spec.name, caller=caller)
    async with LifespanManager(app, startup_timeout=10, shutdown_timeout=10) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://svc", headers=headers
        ) as client:
            client.app_context = app.state.ctx  # type: ignore[attr-defined]
            client.app_transport = transport  # type: ignore[attr-defined]
            yield client


def bearer(
    secret: SecretStr, *, audience: str, caller: str = "order", ttl: float = TOKEN_TTL
) -> dict[str, str]:
    """An ``Authorization`` header with a token from ``caller`` to ``audience`` signed with
    ``secret`` (a negative ``ttl``: already expired)."""
    tokens = ServiceTokens(secret, service=caller)
    return {"Authorization": f"Bearer {tokens.issue(audience, now=time.time(), ttl=ttl)}"}


@asynccontextmanager
async def anonymous(client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the same app as ``client`` (from :func:`running`) sending no token."""
    transport: httpx.ASGITransport = client.app_transport  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=transport, base_url=client.base_url) as plain:
        yield plain


def context_of(client: httpx.AsyncClient) -> ServiceContext:
    """The ServiceContext of the app behind ``client``."""
    ctx: ServiceContext = client.app_context  # type: ignore[attr-defined]
    return ctx


async def wait_ready(client: httpx.AsyncClient, within: float = 10.0) -> dict[str, Any]:
    """Poll /health/ready until 200; returns its body."""
    async with asyncio.timeout(within):
        while True:
            response = await client.get("/health/ready")
            if response.status_code == 200:
                body: dict[str, Any] = response.json()
                return body
            await asyncio.sleep(0.05)
