"""What every :class:`~ordermesh_shared.discovery.Registry` backend must do, as one harness.

tests/integration/test_registry_contract.py runs the same tests against etcd, Consul (the
double's HTTP API) and DNS (the double's DNS interface, registration through its HTTP API).
A backend differs only in how long a change may take to reach a watcher's cache
(``settle``: at once for the watch-fed caches, up to a TTL for DNS) and in how its registry
is made unreachable (``outage``).

Instances are real loopback HTTP servers (Consul's checks call their ``/health/ready``) and
carry the id a service gives itself by default, ``<service>-<host>-<port>``, the only id DNS
can give back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from aiohttp import web
from ordermesh_shared.discovery import Registry, ServiceInstance


@dataclass(frozen=True)
class Backend:
    """One registry backend under test."""

    name: str
    open: Callable[[], Registry]
    settle: float
    outage: Callable[[], AbstractAsyncContextManager[None]]


class InstanceServer:
    """A stand-in instance of ``payment`` whose readiness a test controls."""

    def __init__(self) -> None:
        self.ready = True
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def instance(self) -> ServiceInstance:
        port = self.port
        return ServiceInstance("payment", f"payment-127.0.0.1-{port}", "127.0.0.1", port)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _ready(self, _request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)


async def instance_servers(count: int) -> AsyncIterator[list[InstanceServer]]:
    """``count`` started instance servers, stopped afterwards (a fixture's body)."""
    servers = [InstanceServer() for _ in range(count)]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


def ids(registry: Registry) -> list[str]:
    return [i.instance_id for i in registry.instances("payment")]


async def eventually(check: Callable[[], bool], *, within: float, what: str) -> float:
    """Seconds until ``check()`` holds; AssertionError after ``within``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def holds(check: Callable[[], bool], *, for_: float, what: str) -> None:
    """AssertionError if ``check()`` stops holding at any time within ``for_`` seconds."""
    ends = time.monotonic() + for_
    while time.monotonic() < ends:
        assert check(), what
        await asyncio.sleep(0.02)
