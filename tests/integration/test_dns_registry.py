"""DnsRegistry against the Consul double's DNS interface: what DNS discovery shows that a
watch-fed cache does not (staleness up to a TTL), and the double answering as Consul does."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from ordermesh_shared.discovery import Registry, RegistryError
from ordermesh_shared.discovery.consul import ConsulRegistry
from ordermesh_shared.discovery.dns import DnsRegistry

from tests.support.consul_double import ConsulDoubleServer
from tests.support.etcd import free_port
from tests.support.registry_contract import InstanceServer, eventually, ids, instance_servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

TTL = 2.0


def watching_consul(url: str) -> ConsulRegistry:
    return ConsulRegistry(
        url,
        check_interval="50ms",
        check_timeout="500ms",
        deregister_critical_after="300ms",
        wait="10s",
        min_refresh_interval=0.05,
    )


def dns_registry(double: ConsulDoubleServer, *, register: bool = True) -> DnsRegistry:
    registrar = watching_consul(double.url) if register else None
    return DnsRegistry(f"127.0.0.1:{double.dns_port}", registrar=registrar, min_ttl=0.05)


@pytest.fixture
async def servers() -> AsyncIterator[list[InstanceServer]]:
    async for started in instance_servers(5):
        yield started


def srv_queries(double: ConsulDoubleServer) -> int:
    return sum(1 for _, name, kind in double.dns.queries if kind == "SRV")


async def test_dns_membership_stays_stale_for_a_ttl_after_an_instance_dies(
    consul_double: ConsulDoubleServer, servers: list[InstanceServer]
) -> None:
    consul_double.dns.service_ttl = TTL
    dying, staying = servers[0], servers[1]
    async with (
        dns_registry(consul_double) as through_dns,
        watching_consul(consul_double.url) as watch_fed,
    ):
        for server in (dying, staying):
            await through_dns.register(server.instance)
        await watch_fed.watch("payment")
        await through_dns.watch("payment")
        await eventually(lambda: len(ids(watch_fed)) == 2, within=2, what="checks passed")
        await eventually(lambda: len(ids(through_dns)) == 2, within=TTL + 1, what="in DNS")
        # Die right after a lookup, so the answer in the cache has its whole TTL to run.
        asked = srv_queries(consul_double)
        await eventually(lambda: srv_queries(consul_double) > asked, within=TTL + 1, what="lookup")

        await dying.stop()
        rows = await timeline(watch_fed, through_dns, gone=dying.instance.instance_id)

    print_timeline(rows, dead=dying.instance.instance_id)
    watch_learned, dns_learned = (gone_after(rows, view, dying) for view in (1, 2))
    assert watch_learned < 0.5
    assert TTL / 2 < dns_learned < TTL + 0.5
    # Stale, not wrong: the live instance is in both lists all along.
    assert all(staying.instance.instance_id in row[1] + row[2] for row in rows)


Row = tuple[float, list[str], list[str]]  # seconds since the death, watch-fed ids, DNS ids
STEP = 0.25


async def timeline(watch_fed: Registry, through_dns: Registry, *, gone: str) -> list[Row]:
    """What both caches hold from now until neither holds ``gone``: a row every STEP
    seconds and one at each change (polled every 10 ms)."""
    started, rows = time.monotonic(), list[Row]()
    while not rows or gone in rows[-1][1] + rows[-1][2]:
        await asyncio.sleep(0.01)
        at = time.monotonic() - started
        views = ids(watch_fed), ids(through_dns)
        if not rows or views != rows[-1][1:] or at - rows[-1][0] >= STEP:
            rows.append((at, *views))
        assert at < TTL + 1, "DNS still names the dead instance after a TTL"
    return rows


def gone_after(rows: list[Row], view: int, dying: InstanceServer) -> float:
    return next(row[0] for row in rows if dying.instance.instance_id not in row[view])


def print_timeline(rows: list[Row], *, dead: str) -> None:
    """The staleness made visible (pytest -s): instances by port."""

    def show(view: list[str]) -> str:
        return " ".join(i.rsplit("-", 1)[1] + ("(dead)" if i == dead else "") for i in view)

    print(f"\n{'after death':>11}  {'watch-fed cache (Consul)':<26}DNS (SRV, TTL {TTL:g} s)")
    for at, watched, looked_up in rows:
        stale = "   <- stale" if watched != looked_up else ""
        print(f"{at:>9.2f} s  {show(watched):<26}{show(looked_up)}{stale}")


async def test_every_instance_is_found_although_a_udp_answer_holds_three(
    consul_double: ConsulDoubleServer, servers: list[InstanceServer]
) -> None:
    async with dns_registry(consul_double) as registry:
        for server in servers:
            await registry.register(server.instance)
        await eventually(
            lambda: len(registry_answers(consul_double)) == 5, within=2, what="all passing"
        )
        udp_reply = await udp_srv(consul_double, "payment.service.consul.")
        assert len(udp_reply.answer[0]) == 3
        await registry.watch("payment")
        want = sorted(s.instance.instance_id for s in servers)
        await eventually(lambda: ids(registry) == want, within=2, what="all five")


async def udp_srv(double: ConsulDoubleServer, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "SRV")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=double.dns_port, timeout=2)


async def test_the_double_answers_only_healthy_instances_and_nxdomain_otherwise(
    consul_double: ConsulDoubleServer, servers: list[InstanceServer]
) -> None:
    async with dns_registry(consul_double) as registry:
        await registry.register(servers[0].instance)
        servers[0].ready = False
        await eventually(
            lambda: consul_double.agent.check(servers[0].instance.instance_id).output != "",
            within=2,
            what="a check run",
        )
        reply = await udp_srv(consul_double, "payment.service.consul.")
        assert reply.rcode() == dns.rcode.NXDOMAIN  # registered, but critical
        assert reply.authority[0].name.to_text() == "consul."

        servers[0].ready = True
        await eventually(lambda: bool(registry_answers(consul_double)), within=2, what="passing")
        reply = await udp_srv(consul_double, "_payment._tcp.service.consul.")
        [srv] = reply.answer[0]
        [address] = reply.additional[0]
        assert (srv.port, address.address) == (servers[0].port, "127.0.0.1")
        assert srv.target.to_text() == "7f000001.addr.dc1.consul."

        outside = await udp_srv(consul_double, "payment.example.org.")
        assert outside.rcode() == dns.rcode.REFUSED


def registry_answers(double: ConsulDoubleServer) -> list[str]:
    return [s.service_id for s in double.agent.dns_instances("payment")]


async def test_an_unknown_service_is_empty_not_an_error(consul_double: ConsulDoubleServer) -> None:
    async with dns_registry(consul_double, register=False) as registry:
        await registry.watch("nowhere")
        await registry.ping()

        assert registry.instances("nowhere") == ()


async def test_without_a_registrar_registration_is_left_to_the_platform(
    consul_double: ConsulDoubleServer, servers: list[InstanceServer]
) -> None:
    async with dns_registry(consul_double, register=False) as registry:
        await registry.register(servers[0].instance)
        await registry.deregister(servers[0].instance)

    assert consul_double.agent.service_ids == []
    assert consul_double.agent.requests == []


async def test_watch_raises_registry_error_naming_the_server_when_nothing_answers() -> None:
    port = free_port()
    async with DnsRegistry(f"127.0.0.1:{port}", timeout=0.3) as registry:
        with pytest.raises(RegistryError, match=f"127.0.0.1:{port}"):
            await registry.watch("payment")

        assert registry.instances("payment") == ()


async def test_a_dns_server_named_by_host_is_resolved_on_entry(
    consul_double: ConsulDoubleServer,
) -> None:
    async with DnsRegistry(f"localhost:{consul_double.dns_port}") as registry:
        await registry.ping()
    with pytest.raises(RegistryError, match=re.escape("no-such-host.invalid")):
        async with DnsRegistry("no-such-host.invalid:8600"):
            pass


async def test_leaving_the_registry_stops_its_refresh_tasks(
    consul_double: ConsulDoubleServer,
) -> None:
    async with dns_registry(consul_double, register=False) as registry:
        await registry.watch("payment")
        await registry.watch("payment")  # idempotent
        assert refreshers() == ["dns-refresh-payment"]
    assert refreshers() == []


def refreshers() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("dns-refresh")]
