"""The order service with the participants it needs for the overview's tests: a completed
order, a cancelled one (payment refuses, its undos go through) and a parked one (payment
refuses and inventory refuses to release: compensation_failed).

>>> async with overview_app(database, vhost, etcd_url=etcd.url) as app:
...     parked = await app.place("stuck")          # the order's id once its saga ended
...     await app.client.get("/admin/overview", headers=app.admin)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
from aiohttp import web
from order.app import OrderSettings, order_spec
from order.app_state import order_runtime
from pydantic import SecretStr

from tests.support.apps import context_of, running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.http_serving import loopback_socket, serving
from tests.support.participants import FakeParticipants

ADMIN_TOKEN = "overview-admin-token"
REFUSED_PAYMENT = ("broke", "stuck")  # customers whose charge payment refuses
TERMINAL = ("completed", "cancelled", "compensation_failed")

# What a real participant's /health/ready carries: the overview reads the outbox lag from it.
PARTICIPANT_READY = {
    "status": "ok",
    "checks": {"database": "ok", "registry": "ok", "rabbitmq": "ok"},
    "details": {
        "outbox": {"pending": 2, "oldest_pending_age_seconds": 0.5, "quarantined": 1},
        "outbox_relay": {"state": "standby"},
    },
}


class ScriptedParticipants(FakeParticipants):
    """FakeParticipants that refuse the charges of REFUSED_PAYMENT customers and the stock
    release of "stuck" orders, and answer /health/ready like a real participant."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck: set[str] = set()
        self.refused: list[str] = []  # "<method> <path>" of every refusal, in order

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/health/ready":
            return web.json_response(PARTICIPANT_READY)
        if request.path == "/payments":
            body = await request.json()
            if body["customer_id"] in REFUSED_PAYMENT:
                if body["customer_id"] == "stuck":
                    self.stuck.add(body["order_id"])
                return self._refuse(request, 402, "insufficient_funds", "balance too low")
        if request.path.endswith("/release") and request.path.split("/")[2] in self.stuck:
            return self._refuse(request, 409, "release_refused", "reservation is locked")
        return await super().handle(request)

    def _refuse(self, request: web.Request, status: int, reason: str, detail: str) -> web.Response:
        self.refused.append(f"{request.method} {request.path}")
        return web.json_response({"reason": reason, "detail": detail}, status=status)


@dataclass
class OverviewApp:
    """The running order app, its participants and registry, and the admin header."""

    client: httpx.AsyncClient
    participants: ScriptedParticipants
    registry: InMemoryRegistry
    settings: OrderSettings

    @property
    def admin(self) -> dict[str, str]:
        return {"X-Admin-Token": ADMIN_TOKEN}

    async def place(self, customer: str) -> str:
        """Place an order for ``customer``; its id once its saga has ended."""
        body = {"customer_id": customer, "items": [{"sku": "KB-101", "quantity": 1}]}
        answer = await self.client.post("/orders", json={**body, "destination": "DE"})
        assert answer.status_code in (201, 202), answer.text
        order_id: str = answer.json()["id"]
        async with asyncio.timeout(15):
            while (await self.client.get(f"/orders/{order_id}")).json()["status"] not in TERMINAL:
                await asyncio.sleep(0.05)
        return order_id

    async def overview(self) -> dict[str, Any]:
        answer = await self.client.get("/admin/overview", headers=self.admin)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


@asynccontextmanager
async def overview_app(
    database: str,
    vhost: str,
    *,
    etcd_url: str,
    port: int,
    participants: ScriptedParticipants | None = None,
) -> AsyncIterator[OverviewApp]:
    """The order app (relay elected on ``etcd_url``) with scripted participants (a subclass
    of ScriptedParticipants, for a test that scripts more)."""
    registry = InMemoryRegistry()
    participants = participants or ScriptedParticipants()
    settings = OrderSettings(
        database_url=database,
        rabbitmq_url=vhost,
        etcd_url=etcd_url,
        port=port,
        admin_token=SecretStr(ADMIN_TOKEN),
    )
    async with (
        participants.serving(registry),
        running(order_spec(settings), settings, registry) as client,
    ):
        await wait_ready(client)
        # One refused undo parks the saga (the default, 8 with backoff, takes ~10 s).
        engine = order_runtime(context_of(client)).engine
        engine.policy = replace(engine.policy, compensation_attempts=1)
        yield OverviewApp(client, participants, registry, settings)


@asynccontextmanager
async def serving_http(client: httpx.AsyncClient) -> AsyncIterator[str]:
    """Serve the app behind ``client`` (its lifespan already running) over real HTTP on a
    free loopback port; yields its base URL (for a browser)."""
    with loopback_socket() as sock:
        async with serving(client, sock):
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
