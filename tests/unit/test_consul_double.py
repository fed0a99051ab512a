"""Pins the Consul double to Consul's documented semantics, so the backend's tests mean something.

In-process over ASGI with a fake check probe: no sockets, no real time beyond a few hundred ms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests.support.consul_double import (
    CONSUL_TIMING,
    CRITICAL,
    FAST_TIMING,
    PASSING,
    WARNING,
    ConsulDouble,
)

pytestmark = pytest.mark.timeout(10)

CHECK_URL = "http://10.0.0.1:8002/health/ready"


class FakeProbe:
    """Answers check runs from ``status``; clear ``gate`` to hold every run mid-flight."""

    def __init__(self) -> None:
        self.status = CRITICAL
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, url: str) -> tuple[str, str]:
        await self.gate.wait()
        return self.status, f"fake {self.status}"


@pytest.fixture
def probe() -> FakeProbe:
    return FakeProbe()


@pytest.fixture
async def agent(probe: FakeProbe) -> AsyncIterator[ConsulDouble]:
    async with ConsulDouble(timing=FAST_TIMING, probe=probe) as agent:
        yield agent


@pytest.fixture
async def client(agent: ConsulDouble) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=agent)
    async with httpx.AsyncClient(transport=transport, base_url="http://consul") as client:
        yield client


def definition(service_id: str = "web-1", **check: Any) -> dict[str, Any]:
    # Lower-case keys and a "checks" list: exactly how py-consul sends a registration.
    spec = {"http": CHECK_URL, "interval": "20ms", **check}
    return {"name": "web", "id": service_id, "address": "10.0.0.1", "port": 8002, "checks": [spec]}


async def register(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await client.put("/v1/agent/service/register", json=body)
    assert response.status_code == 200, response.text


async def health(client: httpx.AsyncClient, **params: str) -> tuple[int, list[dict[str, Any]]]:
    response = await client.get("/v1/health/service/web", params=params)
    assert response.status_code == 200, response.text
    return int(response.headers["X-Consul-Index"]), response.json()


async def until(condition: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within}s"
        await asyncio.sleep(0.01)


async def test_a_new_check_is_critical_until_its_first_run(
    agent: ConsulDouble, client: httpx.AsyncClient, probe: FakeProbe
) -> None:
    probe.gate.clear()
    probe.status = PASSING
    await register(client, definition())

    _, entries = await health(client)
    assert [c["Status"] for c in entries[0]["Checks"]] == [PASSING, CRITICAL]  # serfHealth first
    assert entries[0]["Checks"][1]["CheckID"] == "service:web-1"
    assert await health(client, passing="true") == (agent.index_of("web"), [])

    probe.gate.set()
    await until(lambda: agent.check("web-1").status == PASSING)


async def test_a_status_in_the_definition_is_the_initial_status(
    client: httpx.AsyncClient, probe: FakeProbe
) -> None:
    probe.gate.clear()
    await register(client, definition(Status=PASSING))

    _, entries = await health(client, passing="1")
    assert [e["Service"]["ID"] for e in entries] == ["web-1"]


@pytest.mark.parametrize(
    ("value", "filtered"), [("", True), ("1", True), ("true", True), ("false", False)]
)
async def test_passing_is_read_as_a_go_bool(
    client: httpx.AsyncClient, probe: FakeProbe, value: str, filtered: bool
) -> None:
    probe.gate.clear()
    await register(client, definition())
    _, entries = await health(client, passing=value)
    assert len(entries) == (0 if filtered else 1)


async def test_an_unreadable_passing_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/health/service/web", params={"passing": "maybe"})
    assert (response.status_code, response.text) == (400, "Invalid value for ?passing")


async def test_a_query_behind_the_current_index_returns_at_once(
    agent: ConsulDouble, client: httpx.AsyncClient
) -> None:
    await register(client, definition())
    index = agent.index_of("web")

    started = time.monotonic()
    assert (await health(client, index=str(index - 1), wait="5s"))[0] == index
    assert time.monotonic() - started < 0.5


async def test_a_blocking_query_returns_when_its_service_changes(
    agent: ConsulDouble, client: httpx.AsyncClient, probe: FakeProbe
) -> None:
    probe.gate.clear()
    await register(client, definition())
    index = agent.index_of("web")
    query = asyncio.create_task(health(client, index=str(index), wait="5s"))

    await register(client, {"name": "other", "id": "other-1"})  # another service: no wake-up
    await asyncio.sleep(0.2)
    assert not query.done()

    probe.status = WARNING
    probe.gate.set()
    new_index, entries = await asyncio.wait_for(query, 1.0)
    assert new_index > index
    assert entries[0]["Checks"][1]["Status"] == WARNING


async def test_a_blocking_query_ends_after_wait_with_the_same_index(
    agent: ConsulDouble, client: httpx.AsyncClient, probe: FakeProbe
) -> None:
    probe.gate.clear()  # no check run may change anything
    await register(client, definition(Status=PASSING))
    index = agent.index_of("web")

    started = time.monotonic()
    assert (await health(client, index=str(index), wait="200ms"))[0] == index
    assert 0.2 <= time.monotonic() - started < 0.2 * 17 / 16 + 0.15  # wait plus <= wait/16


async def test_an_identical_reregistration_keeps_status_and_index(
    agent: ConsulDouble, client: httpx.AsyncClient, probe: FakeProbe
) -> None:
    probe.status = PASSING
    await register(client, definition())
    await until(lambda: agent.check("web-1").status == PASSING)
    index = agent.index_of("web")

    await register(client, definition())

    assert agent.check("web-1").status == PASSING
    assert agent.index_of("web") == index


async def test_the_index_moves_forward_when_the_last_instance_leaves(
    agent: ConsulDouble, client: httpx.AsyncClient
) -> None:
    await register(client, definition())
    before = agent.index_of("web")

    response = await client.put("/v1/agent/service/deregister/web-1")

    assert response.status_code == 200
    assert await health(client) == (before + 1, [])
    missing = await client.put("/v1/agent/service/deregister/web-1")
    assert (missing.status_code, missing.text) == (404, 'Unknown service ID "web-1"')


async def test_an_unknown_service_has_an_index_of_at_least_one(client: httpx.AsyncClient) -> None:
    index, entries = await health(client)
    assert index >= 1
    assert entries == []


async def test_rewinding_releases_blocked_queries_with_a_lower_index(
    agent: ConsulDouble, client: httpx.AsyncClient, probe: FakeProbe
) -> None:
    probe.gate.clear()
    await register(client, definition(Status=PASSING))
    index = agent.index_of("web")
    query = asyncio.create_task(health(client, index=str(index), wait="5s"))
    await asyncio.sleep(0.05)

    agent.rewind(to=2)

    assert (await asyncio.wait_for(query, 1.0))[0] == 2


async def test_keys_match_in_any_case_and_in_snake_case(
    agent: ConsulDouble, client: httpx.AsyncClient
) -> None:
    await register(
        client,
        {
            "Name": "web",
            "ID": "web-1",
            "Check": {
                "HTTP": CHECK_URL,
                "Interval": "1s",
                "deregister_critical_service_after": "5m",
            },
        },
    )
    assert agent.check("web-1").deregister_after == 300.0


async def test_bad_definitions_are_refused_like_consul(client: httpx.AsyncClient) -> None:
    no_name = await client.put("/v1/agent/service/register", json={"id": "x"})
    bad_meta = await client.put(
        "/v1/agent/service/register", json={"name": "web", "meta": {"bad.key": "v"}}
    )
    no_interval = await client.put(
        "/v1/agent/service/register", json={"name": "web", "check": {"http": CHECK_URL}}
    )
    assert (no_name.status_code, no_name.text) == (400, "Missing service name")
    assert bad_meta.status_code == 400
    assert "Invalid Service Meta" in bad_meta.text
    assert no_interval.status_code == 400
    assert "Interval must be > 0" in no_interval.text


async def test_consul_time_floors_apply_by_default(probe: FakeProbe) -> None:
    async with ConsulDouble(timing=CONSUL_TIMING, probe=probe) as agent:
        transport = httpx.ASGITransport(app=agent)
        async with httpx.AsyncClient(transport=transport, base_url="http://consul") as client:
            await register(client, definition(DeregisterCriticalServiceAfter="1s"))
        check = agent.check("web-1")
    assert (check.interval, check.deregister_after) == (1.0, 60.0)


async def test_the_reaper_removes_only_services_critical_past_their_limit(
    agent: ConsulDouble, client: httpx.AsyncClient, probe: FakeProbe
) -> None:
    probe.status = CRITICAL
    await register(client, definition("web-1", DeregisterCriticalServiceAfter="100ms"))
    await register(client, definition("web-2"))  # critical too, but no limit: never reaped

    await until(lambda: agent.service_ids == ["web-2"])
    await asyncio.sleep(0.2)
    assert agent.service_ids == ["web-2"]
