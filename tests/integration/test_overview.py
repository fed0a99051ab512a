"""The overview's JSON (``GET /admin/overview``) against the real order app on Postgres,
RabbitMQ and a private etcd: sagas with their step timelines (a parked one with its retry),
breakers, instances with health, relay leaders, outbox and consumer lag; each part unknown
alone when its source is down; admin token required."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ordermesh_shared.discovery import ServiceInstance

from tests.support.etcd import EtcdServer, free_port
from tests.support.overview import ADMIN_TOKEN, OverviewApp, overview_app

pytestmark = pytest.mark.integration


def saga_in(sagas: list[dict[str, Any]], order_id: str) -> dict[str, Any]:
    found = [s for s in sagas if s["id"] == order_id]
    assert found, f"saga {order_id} not in {[s['id'] for s in sagas]}"
    return found[0]


def timeline(saga: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(s["step"], s["direction"], s["status"]) for s in saga["steps"]]


def service(body: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in body["services"] if s["name"] == name)


async def overview_when(app: OverviewApp, ready: Any, within: float = 10.0) -> dict[str, Any]:
    """The overview once ``ready(body)`` holds (the relay election takes a moment)."""
    async with asyncio.timeout(within):
        while not ready(body := await app.overview()):
            await asyncio.sleep(0.1)
    return body


async def test_completed_cancelled_and_parked_sagas_show_with_their_step_timelines(
    fresh_database: str, rabbit_vhost: str, etcd_server: EtcdServer
) -> None:
    async with overview_app(
        fresh_database, rabbit_vhost, etcd_url=etcd_server.url, port=free_port()
    ) as app:
        completed = await app.place("alice")
        cancelled = await app.place("broke")
        parked = await app.place("stuck")
        body = await app.overview()

    sagas = body["sagas"]
    assert sagas["status"] == "ok"
    assert [s["id"] for s in sagas["recent"]] == [parked, cancelled, completed]
    assert timeline(saga_in(sagas["recent"], completed)) == [
        ("reserve_stock", "forward", "succeeded"),
        ("charge_payment", "forward", "succeeded"),
        ("create_shipment", "forward", "succeeded"),
        ("commit_stock", "forward", "succeeded"),
    ]
    undone = saga_in(sagas["recent"], cancelled)
    assert undone["status"] == "cancelled"
    assert not undone["parked"]
    assert timeline(undone) == [
        ("reserve_stock", "forward", "succeeded"),
        ("charge_payment", "forward", "rejected"),  # a refusal: nothing of it to undo
        ("reserve_stock", "compensate", "succeeded"),
    ]
    stuck = saga_in(sagas["parked"], parked)
    assert stuck == saga_in(sagas["recent"], parked)
    assert stuck["parked"]
    assert stuck["status"] == "compensation_failed"
    assert stuck["retry_url"] == f"/orders/{parked}/retry"
    assert timeline(stuck)[-1] == ("reserve_stock", "compensate", "failed")
    assert "release_refused" in stuck["steps"][-1]["last_error"]
    assert stuck["steps"][-1]["attempts"] == 1
    assert sagas["in_flight"] == []
    assert [s["id"] for s in sagas["parked"]] == [parked]


async def test_breakers_instances_leaders_outbox_and_queues(
    fresh_database: str, rabbit_vhost: str, etcd_server: EtcdServer
) -> None:
    async with overview_app(
        fresh_database, rabbit_vhost, etcd_url=etcd_server.url, port=free_port()
    ) as app:
        await app.place("alice")
        own = app.settings.instance_id
        body = await overview_when(
            app, lambda b: service(b, "order")["relay_leader"]["leader"] == own
        )

    assert body["instance"] == own
    assert body["breakers"] == {
        "status": "ok",
        "reason": None,
        "targets": {s: {f"{s}-1": "closed"} for s in ("inventory", "payment", "shipping")},
    }
    order = service(body, "order")
    assert order["outbox"]["status"] == "ok"
    assert order["outbox"]["source"] == "database"
    assert order["outbox"]["quarantined"] == 0
    payment = service(body, "payment")
    assert [(i["instance_id"], i["health"], i["relay"]) for i in payment["instances"]] == [
        ("payment-1", "ok", "standby")
    ]
    assert payment["outbox"] == {
        "status": "ok",
        "reason": None,
        "pending": 2,
        "oldest_pending_age_seconds": 0.5,
        "quarantined": 1,
        "source": "payment-1",
    }
    assert payment["relay_leader"] == {"status": "ok", "reason": None, "leader": None}
    queues = {q["name"]: q for q in body["queues"]}
    assert queues["order.timeline"]["status"] == "ok"
    assert queues["order.timeline"]["consumers"] >= 1


async def test_a_down_participant_and_a_down_etcd_show_as_unknown_beside_the_rest(
    fresh_database: str, rabbit_vhost: str, etcd_server: EtcdServer
) -> None:
    async with overview_app(
        fresh_database, rabbit_vhost, etcd_url=etcd_server.url, port=free_port()
    ) as app:
        completed = await app.place("alice")
        # A second shipping instance that is registered but does not answer.
        dead = ServiceInstance("shipping", "shipping-2", "127.0.0.1", free_port())
        await app.registry.register(dead)
        # Inventory away altogether: no instance to ask for its outbox.
        app.registry.entries.pop("inventory")
        etcd_server.kill()
        body = await app.overview()

    shipping = service(body, "shipping")
    health = {i["instance_id"]: i for i in shipping["instances"]}
    assert health["shipping-1"]["health"] == "ok"
    assert health["shipping-2"]["health"] == "unknown"
    assert "cannot connect" in health["shipping-2"]["reason"]
    inventory = service(body, "inventory")
    assert inventory["instances"] == []
    assert inventory["outbox"]["status"] == "unknown"
    assert inventory["outbox"]["reason"] == "no instance registered"
    for name in ("order", "inventory", "payment", "shipping"):
        leader = service(body, name)["relay_leader"]
        assert leader["status"] == "unknown", leader
        assert leader["reason"], leader
    # The rest is still there.
    assert saga_in(body["sagas"]["recent"], completed)["status"] == "completed"
    assert service(body, "payment")["outbox"]["status"] == "ok"


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"X-Admin-Token": "not-the-token"}, 403)],
)
async def test_the_overview_needs_the_admin_token(
    fresh_database: str,
    rabbit_vhost: str,
    etcd_server: EtcdServer,
    headers: dict[str, str],
    status: int,
) -> None:
    async with overview_app(
        fresh_database, rabbit_vhost, etcd_url=etcd_server.url, port=free_port()
    ) as app:
        await app.place("stuck")
        answer = await app.client.get("/admin/overview", headers=headers)
        page = await app.client.get("/ui")
    assert answer.status_code == status
    assert "X-Admin-Token" in answer.json()["detail"]
    assert ADMIN_TOKEN not in answer.text
    # The page itself holds no data: it is served to anyone, and asks for the token.
    assert page.status_code == 200
    assert "sagas-parked" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
