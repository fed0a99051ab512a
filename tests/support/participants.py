"""Inventory, payment and shipping as one scripted aiohttp server on loopback, registered
for the three services: the order service's saga calls it through the real ServiceClient.

>>> participants = FakeParticipants(payment_delay=0.4)     # or hold_payments=True
>>> async with participants.serving(registry):
...     ...                                                  # participants.calls, .payments
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from ordermesh_shared.discovery import ServiceInstance

from tests.support.fakes import InMemoryRegistry


class FakeParticipants:
    """Answers every step and undo; records each call; can slow or hold payments and lose
    commits' answers."""

    def __init__(self, *, payment_delay: float = 0.0, hold_payments: bool = False) -> None:
        self.calls: list[str] = []
        self.payments = 0
        self.payment_delay = payment_delay
        # Held payments wait for ``release`` (set: nothing is held).
        self.release = asyncio.Event()
        if not hold_payments:
            self.release.set()
        self.commit_lost_until = 0.0  # loop time until which commits happen, answers lost

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.calls.append(f"{request.method} {path}")
        if path.endswith("/commit") and asyncio.get_running_loop().time() < self.commit_lost_until:
            await asyncio.sleep(2)  # longer than an attempt may take: its answer is lost
        if path == "/payments":
            self.payments += 1
            await asyncio.sleep(self.payment_delay)
            await self.release.wait()
            return web.json_response({"id": str(uuid.uuid4())}, status=201)
        if path == "/reservations":
            body = await request.json()
            lines = [{"sku": i["sku"], "unit_price": "10.00"} for i in body["items"]]
            return web.json_response({"items": lines, "total": "10.00"}, status=201)
        if path == "/shipments":
            return web.json_response({"id": str(uuid.uuid4())}, status=201)
        return web.json_response({})  # commit, and the compensations

    @asynccontextmanager
    async def serving(self, registry: InMemoryRegistry) -> AsyncIterator[None]:
        """Serve on a free port, registered as inventory, payment and shipping."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        for service in ("inventory", "payment", "shipping"):
            await registry.register(ServiceInstance(service, f"{service}-1", "127.0.0.1", port))
        try:
            yield
        finally:
            self.release.set()  # a held handler must not keep the runner's cleanup waiting
            await runner.cleanup()
