"""ConsulRegistry against the Consul double: real HTTP checks on real loopback servers.

Each instance is a tiny aiohttp server whose ``/health/ready`` the test flips between 200 and
503; the double polls it like a Consul agent. Timings are compressed (checks every 50 ms,
reaping after 300 ms) while blocking queries wait 10 s, so "prompt" means well under the wait.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from ordermesh_shared.discovery import RegistryError, ServiceInstance
from ordermesh_shared.discovery.consul import ConsulRegistry

from tests.support.consul_double import CRITICAL, ConsulDoubleServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

WAIT = 10.0
HEALTH = "/v1/health/service/payment"
REGISTER = "/v1/agent/service/register"


def fast_registry(url: str, *, wait: str = f"{WAIT:g}s") -> ConsulRegistry:
    return ConsulRegistry(
        url,
        check_interval="50ms",
        check_timeout="500ms",
        deregister_critical_after="300ms",
        wait=wait,
        timeout=2.0,
        min_refresh_interval=0.05,
        recheck_interval=0.3,
    )


class InstanceServer:
    """A stand-in service instance whose readiness the test controls."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.ready = True
        self.meta = {"version": "1"}
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def instance(self) -> ServiceInstance:
        return ServiceInstance(
            "payment", self.instance_id, host="127.0.0.1", port=self.port, meta=dict(self.meta)
        )

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


async def eventually(condition: Callable[[], bool], what: str, *, within: float = 3.0) -> float:
    """Seconds until ``condition()`` holds; fails the test after ``within``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
async def server() -> AsyncIterator[InstanceServer]:
    instance = InstanceServer("payment-1")
    await instance.start()
    yield instance
    await instance.stop()


@pytest.fixture
async def registry(consul_double: ConsulDoubleServer) -> AsyncIterator[ConsulRegistry]:
    async with fast_registry(consul_double.url) as registry:
        yield registry


async def listed(registry: ConsulRegistry, server: InstanceServer) -> None:
    await eventually(lambda: registry.instances("payment") == (server.instance,), "listed")


async def test_an_instance_is_listed_only_once_its_check_passes(
    consul_double: ConsulDoubleServer, registry: ConsulRegistry, server: InstanceServer
) -> None:
    agent = consul_double.agent
    server.ready = False
    await registry.watch("payment")
    await registry.register(server.instance)

    assert agent.service_ids == ["payment-1"]
    await eventually(lambda: "503" in agent.check("payment-1").output, "a first check run")
    assert agent.check("payment-1").status == CRITICAL
    assert registry.instances("payment") == ()

    server.ready = True
    await listed(registry, server)
    assert registry.instances("payment")[0].meta == {"version": "1"}


async def test_an_unready_instance_leaves_the_list_and_comes_back(
    registry: ConsulRegistry, server: InstanceServer
) -> None:
    await registry.watch("payment")
    await registry.register(server.instance)
    await listed(registry, server)

    server.ready = False
    gone = await eventually(lambda: registry.instances("payment") == (), "dropped when 503")
    server.ready = True
    back = await eventually(lambda: len(registry.instances("payment")) == 1, "back when 200")

    assert max(gone, back) < WAIT / 5


async def test_changes_arrive_through_blocking_queries_not_polling(
    consul_double: ConsulDoubleServer, registry: ConsulRegistry, server: InstanceServer
) -> None:
    agent = consul_double.agent
    await registry.watch("payment")
    await registry.register(server.instance)
    await listed(registry, server)

    quiet_from = len(agent.requests_to(HEALTH))
    await asyncio.sleep(1.0)
    assert len(agent.requests_to(HEALTH)) - quiet_from <= 1

    blocked = agent.requests_to(HEALTH)[-1].query
    assert blocked["wait"] == [f"{WAIT:g}s"]
    assert int(blocked["index"][0]) >= 1
    assert "passing" in blocked
    server.ready = False
    assert await eventually(lambda: registry.instances("payment") == (), "delivered") < 1.0


async def test_deregister_withdraws_the_instance_at_once(
    consul_double: ConsulDoubleServer, registry: ConsulRegistry, server: InstanceServer
) -> None:
    await registry.watch("payment")
    await registry.register(server.instance)
    await listed(registry, server)

    await registry.deregister(server.instance)

    assert consul_double.agent.service_ids == []
    assert await eventually(lambda: registry.instances("payment") == (), "dropped") < 1.0
    await registry.deregister(server.instance)  # already gone: not an error


async def test_the_agent_reaps_an_instance_whose_server_stopped(
    consul_double: ConsulDoubleServer, registry: ConsulRegistry, server: InstanceServer
) -> None:
    agent = consul_double.agent
    await registry.watch("payment")
    await registry.register(server.instance)
    await listed(registry, server)

    await server.stop()

    await eventually(lambda: registry.instances("payment") == (), "dropped from passing")
    await eventually(lambda: agent.service_ids == [], "reaped by the agent")


async def test_register_is_sent_once_and_again_only_when_the_agent_lost_it(
    consul_double: ConsulDoubleServer, registry: ConsulRegistry, server: InstanceServer
) -> None:
    agent = consul_double.agent
    for _ in range(10):
        await registry.register(server.instance)
    assert len(agent.requests_to(REGISTER)) == 1

    agent.forget("payment-1")

    async def keep_registering() -> None:
        while "payment-1" not in agent.service_ids:
            await registry.register(server.instance)
            await asyncio.sleep(0.05)

    async with asyncio.timeout(2):
        await keep_registering()
    assert len(agent.requests_to(REGISTER)) == 2


async def test_a_meta_change_is_registered_again(
    consul_double: ConsulDoubleServer, registry: ConsulRegistry, server: InstanceServer
) -> None:
    await registry.watch("payment")
    await registry.register(server.instance)
    await listed(registry, server)

    server.meta = {"version": "2"}
    await registry.register(server.instance)

    await eventually(
        lambda: [i.meta for i in registry.instances("payment")] == [{"version": "2"}], "new meta"
    )
    assert len(consul_double.agent.requests_to(REGISTER)) == 2


async def test_a_definition_the_agent_refuses_raises_registry_error_with_its_reason(
    registry: ConsulRegistry, server: InstanceServer
) -> None:
    server.meta = {"build.sha": "abc"}  # Consul allows only [A-Za-z0-9_-] in meta keys

    with pytest.raises(
        RegistryError, match=r"refused registering 'payment-1'.*Invalid Service Meta"
    ):
        await registry.register(server.instance)


async def test_leaving_the_context_withdraws_what_it_registered(
    consul_double: ConsulDoubleServer, server: InstanceServer
) -> None:
    async with fast_registry(consul_double.url) as registry:
        await registry.register(server.instance)
        assert consul_double.agent.service_ids == ["payment-1"]

    assert consul_double.agent.service_ids == []


async def test_ping_raises_registry_error_while_the_agent_is_unreachable(
    consul_double: ConsulDoubleServer, registry: ConsulRegistry
) -> None:
    await registry.ping()

    await consul_double.stop()
    with pytest.raises(RegistryError, match=re.escape(consul_double.url)):
        await registry.ping()

    await consul_double.start()
    await registry.ping()
    consul_double.agent.leader = None
    with pytest.raises(RegistryError, match="no leader"):
        await registry.ping()


async def test_the_watch_recovers_after_the_agent_was_unreachable(
    consul_double: ConsulDoubleServer, registry: ConsulRegistry, server: InstanceServer
) -> None:
    await registry.watch("payment")
    await registry.register(server.instance)
    await listed(registry, server)

    await consul_double.stop()
    server.ready = False  # the agent's checks go on; only its API is out of reach
    await asyncio.sleep(0.3)
    assert registry.instances("payment") == (server.instance,)  # stale beats empty

    await consul_double.start()
    await eventually(lambda: registry.instances("payment") == (), "caught up after the outage")


async def test_an_index_that_goes_backwards_restarts_the_blocking_loop(
    consul_double: ConsulDoubleServer, server: InstanceServer
) -> None:
    agent = consul_double.agent
    # A short wait: should the rewind land between two queries, the next one (at the old,
    # now too high index) blocks until its wait runs out before the index is seen to drop.
    async with fast_registry(consul_double.url, wait="300ms") as registry:
        await registry.watch("payment")
        await registry.register(server.instance)
        await listed(registry, server)
        rewound_at = asyncio.get_running_loop().time()

        agent.rewind(to=2)  # a snapshot restore: indexes drop, blocked queries return

        def plain_read_after_rewind() -> bool:
            later = [r for r in agent.requests_to(HEALTH) if r.at > rewound_at]
            return any("index" not in r.query for r in later)

        await eventually(plain_read_after_rewind, "a plain read after the index went backwards")
        server.ready = False
        assert await eventually(lambda: registry.instances("payment") == (), "delivered") < 1.0


async def test_a_zero_index_never_turns_the_watch_into_a_busy_loop(
    consul_double: ConsulDoubleServer,
) -> None:
    agent = consul_double.agent
    async with fast_registry(consul_double.url, wait="300ms") as registry:
        await registry.watch("payment")
        agent.force_index(0)  # a documented Consul bug: X-Consul-Index: 0
        since = len(agent.requests_to(HEALTH))
        await asyncio.sleep(1.2)

    during = agent.requests_to(HEALTH)[since:]
    assert len(during) < 20
    assert any(r.query.get("index") == ["1"] for r in during)
