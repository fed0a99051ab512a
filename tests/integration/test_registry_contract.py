"""One registry contract, three backends: etcd, Consul (the double's HTTP API) and DNS.

The DNS backend reads the double's DNS interface (TTL 1 s) and registers through its HTTP API,
as it does in compose with REGISTRY=dns. What differs is stated in each backend's ``settle``:
a watch-fed cache learns a change at once, DNS within a TTL (see tests/support/registry_contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable

import pytest
from ordermesh_shared.discovery import Registry, RegistryError
from ordermesh_shared.discovery.consul import ConsulRegistry
from ordermesh_shared.discovery.dns import DnsRegistry
from ordermesh_shared.discovery.etcd import EtcdRegistry

from tests.support.consul_double import ConsulDoubleServer
from tests.support.etcd import EtcdServer
from tests.support.registry_contract import (
    Backend,
    InstanceServer,
    eventually,
    holds,
    ids,
    instance_servers,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

DNS_TTL = 1.0


def consul_registry(url: str) -> ConsulRegistry:
    return ConsulRegistry(
        url,
        check_interval="50ms",
        check_timeout="500ms",
        deregister_critical_after="300ms",
        wait="10s",
        timeout=2.0,
        min_refresh_interval=0.05,
        recheck_interval=0.3,
    )


def etcd_backend(request: pytest.FixtureRequest) -> Backend:
    etcd: EtcdServer = request.getfixturevalue("etcd_server")

    @contextlib.asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        etcd.kill()
        yield
        etcd.start()

    return Backend("etcd", lambda: EtcdRegistry(etcd.url, ttl=1.0, timeout=0.5), 1.0, outage)


def consul_outage(
    double: ConsulDoubleServer,
) -> Callable[[], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        await double.stop()
        yield
        await double.start()

    return outage


def consul_backend(request: pytest.FixtureRequest) -> Backend:
    double: ConsulDoubleServer = request.getfixturevalue("consul_double")
    return Backend("consul", lambda: consul_registry(double.url), 1.0, consul_outage(double))


def dns_backend(request: pytest.FixtureRequest) -> Backend:
    double: ConsulDoubleServer = request.getfixturevalue("consul_double")
    double.dns.service_ttl = DNS_TTL

    def open_registry() -> DnsRegistry:
        return DnsRegistry(
            f"127.0.0.1:{double.dns_port}",
            registrar=consul_registry(double.url),
            timeout=0.5,
            min_ttl=0.05,
        )

    # A change reaches DNS after a check run (50 ms) and the cache after at most a TTL.
    return Backend("dns", open_registry, DNS_TTL + 1.0, consul_outage(double))


@pytest.fixture(params=[etcd_backend, consul_backend, dns_backend], ids=["etcd", "consul", "dns"])
def backend(request: pytest.FixtureRequest) -> Backend:
    make: Callable[[pytest.FixtureRequest], Backend] = request.param
    return make(request)


@pytest.fixture
async def servers() -> AsyncIterator[list[InstanceServer]]:
    async for started in instance_servers(2):
        yield started


@pytest.fixture
async def watcher(backend: Backend) -> AsyncIterator[Registry]:
    async with backend.open() as registry:
        await registry.watch("payment")
        yield registry


async def test_a_registered_instance_is_listed_by_a_new_watcher(
    backend: Backend, servers: list[InstanceServer]
) -> None:
    first = servers[0].instance
    async with backend.open() as ours, backend.open() as theirs:
        await ours.register(first)
        await theirs.watch("payment")

        await eventually(
            lambda: ids(theirs) == [first.instance_id], within=backend.settle, what="listed"
        )
        [seen] = theirs.instances("payment")

    assert (seen.host, seen.port, seen.base_url) == (first.host, first.port, first.base_url)


async def test_a_watcher_sees_instances_registered_later(
    backend: Backend, watcher: Registry, servers: list[InstanceServer]
) -> None:
    first, second = (s.instance for s in servers)
    assert ids(watcher) == []
    async with backend.open() as ours:
        await ours.register(first)
        await eventually(
            lambda: ids(watcher) == [first.instance_id], within=backend.settle, what="first"
        )
        await ours.register(second)
        both = sorted([first.instance_id, second.instance_id])
        await eventually(lambda: ids(watcher) == both, within=backend.settle, what="second")


async def test_deregister_withdraws_the_instance_from_watchers(
    backend: Backend, watcher: Registry, servers: list[InstanceServer]
) -> None:
    first, second = (s.instance for s in servers)
    async with backend.open() as ours:
        await ours.register(first)
        await ours.register(second)
        await eventually(lambda: len(ids(watcher)) == 2, within=backend.settle, what="both")

        await ours.deregister(first)
        await eventually(
            lambda: ids(watcher) == [second.instance_id], within=backend.settle, what="withdrawn"
        )
        await ours.deregister(first)  # already gone: not an error


async def test_leaving_the_registry_withdraws_its_instances(
    backend: Backend, watcher: Registry, servers: list[InstanceServer]
) -> None:
    async with backend.open() as ours:
        await ours.register(servers[0].instance)
        await eventually(lambda: len(ids(watcher)) == 1, within=backend.settle, what="listed")

    await eventually(lambda: ids(watcher) == [], within=backend.settle, what="withdrawn on exit")


async def test_an_unwatched_service_has_no_instances(watcher: Registry) -> None:
    assert watcher.instances("shipping") == ()


async def test_ping_raises_registry_error_while_the_registry_is_unreachable(
    backend: Backend,
) -> None:
    async with backend.open() as registry:
        await registry.ping()
        async with backend.outage():
            with pytest.raises(RegistryError, match=re.escape("127.0.0.1")):
                await registry.ping()
        await eventually_pings(registry)


async def eventually_pings(registry: Registry) -> None:
    async with asyncio.timeout(5):
        while True:
            with contextlib.suppress(RegistryError):
                return await registry.ping()
            await asyncio.sleep(0.05)


async def test_a_watcher_keeps_its_list_through_an_outage_and_follows_changes_after(
    backend: Backend, watcher: Registry, servers: list[InstanceServer]
) -> None:
    first, second = (s.instance for s in servers)
    async with backend.open() as ours:
        await ours.register(first)
        await eventually(
            lambda: ids(watcher) == [first.instance_id], within=backend.settle, what="listed"
        )

        async with backend.outage():
            # Stale beats empty: callers can still reach the instances they knew.
            await holds(
                lambda: ids(watcher) == [first.instance_id], for_=backend.settle, what="kept"
            )

        async with asyncio.timeout(5):
            while True:  # the registering side retries, as a service's presence loop does
                with contextlib.suppress(RegistryError):
                    await ours.register(second)
                    break
                await asyncio.sleep(0.1)
        await eventually(
            lambda: second.instance_id in ids(watcher), within=backend.settle + 3, what="caught up"
        )
