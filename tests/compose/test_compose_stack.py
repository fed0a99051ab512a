"""The docker compose stack end to end, on a real Docker engine (skipped only where none runs).

The session builds every image without a registry (deploy/images/build.sh: a second run
takes seconds), starts docker-compose.yml with deploy/compose/offline.yml through pytest-docker
(Compose v2 or v1, whichever is installed), and then, through the published ports only:
orders complete and compensate; payment scaled to three replicas shares the calls, each found
through the registry; faults under load (a killed payment replica, RabbitMQ stopped for 10 s,
inventory cut off the network for 5 s, the order container restarted with sagas in flight),
each followed by the auditor finding every invariant intact once the fault has healed.
The stack is torn down, volumes included, at the end.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import asyncpg
import httpx
import pytest
from ordermesh_deploy.audit import TERMINAL, audit, render
from ordermesh_deploy.load import LoadResult, run_load

from tests.support.compose import PROJECT, compose, docker, healthy, host_port, wait_for
from tests.support.orders import place

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]
SEED = 14


async def assert_audit_clean(dsns: dict[str, str]) -> None:
    findings = await audit(dsns, within=90)
    assert all(f.ok for f in findings), "\n" + render(findings) + await parked_orders(dsns)


async def parked_orders(dsns: dict[str, str]) -> str:
    """Each parked order's reason and step log: what a failed audit needs to be read."""
    conn = await asyncpg.connect(dsns["order"], timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT o.id, o.failure_reason, s.step, s.direction, s.status, s.attempts,"
            " s.last_error FROM orders o LEFT JOIN saga_steps s ON s.saga_id = o.id"
            " WHERE o.status = 'compensation_failed' ORDER BY o.id, s.started_at"
        )
    finally:
        await conn.close()
    return "".join(f"\n{dict(row)}" for row in rows)


async def under_load(url: str, fault: Any, *, duration: float = 16, rate: float = 8) -> LoadResult:
    """Run ``fault`` (a blocking function) in a thread while orders arrive at ``rate``/s."""
    load = asyncio.create_task(run_load(url, rate=rate, duration=duration, seed=SEED))
    await asyncio.sleep(3)
    await asyncio.to_thread(fault)
    result = await load
    assert result.order_ids, f"no order was accepted: {result.errors}"
    return result


def test_an_order_completes_and_a_declined_one_is_compensated(order_api: str) -> None:
    done = place(
        order_api,
        {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": 1}], "destination": "DE"},
    )
    assert done["status"] == "completed", done
    declined = place(
        order_api,
        {"customer_id": "dave", "items": [{"sku": "KB-101", "quantity": 1}], "destination": "DE"},
    )
    assert declined["status"] == "cancelled", declined
    assert declined["failure_reason"].startswith("insufficient_funds")
    assert [s["step"] for s in declined["steps"]][:2] == ["reserve_stock", "charge_payment"]


def _payment_calls(index: int) -> float:
    port = host_port("payment", 8000, index=index)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    pattern = r'^http_requests_total\{[^}]*method="POST"[^}]*route="/payments"[^}]*\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, flags=re.MULTILINE))


def _registered(service: str, consul_port: str) -> int:
    url = f"http://127.0.0.1:{consul_port}/v1/health/service/{service}?passing=1"
    return len(httpx.get(url, timeout=5).json())


def test_three_payment_replicas_are_discovered_and_share_the_calls(
    order_api: str, compose_env: dict[str, str]
) -> None:
    compose("up", "-d", "--no-build", "--no-recreate", "--scale", "payment=3")
    wait_for("3 healthy payment replicas", lambda: len(healthy("payment")) == 3, within=120)
    consul = compose_env["CONSUL_PORT"]
    wait_for("3 payments registered", lambda: _registered("payment", consul) == 3, within=60)
    before = [_payment_calls(i) for i in (1, 2, 3)]
    body = {
        "customer_id": "carol",
        "items": [{"sku": "MS-202", "quantity": 1}],
        "destination": "DE",
    }
    # Every order completes: a replica that refused the order service's tokens (one started
    # with a secret of its own) would cancel some of them.
    outcomes = [place(order_api, body)["status"] for _ in range(12)]
    assert set(outcomes) == {"completed"}, outcomes
    calls = [_payment_calls(i) - b for i, b in zip((1, 2, 3), before, strict=True)]
    assert all(c > 0 for c in calls), f"charges per replica: {calls}"


async def test_a_killed_payment_replica_under_load_leaves_the_books_balanced(
    order_api: str, audit_dsns: dict[str, str]
) -> None:
    victim = compose("ps", "-q", "payment").split()[0]

    def kill() -> None:
        docker("kill", "--signal", "KILL", victim)

    result = await under_load(order_api, kill)
    # restart: unless-stopped does not apply to a kill; bring the replica back as an operator would.
    await asyncio.to_thread(docker, "start", victim)
    await assert_audit_clean(audit_dsns)
    assert "completed" in result.outcomes, result.outcomes


async def test_rabbitmq_stopped_for_10s_under_load_every_event_arrives_once(
    order_api: str, audit_dsns: dict[str, str]
) -> None:
    def outage() -> None:
        compose("stop", "rabbitmq")
        time.sleep(10)
        compose("start", "rabbitmq")

    await under_load(order_api, outage, duration=20)
    wait_for("rabbitmq healthy again", lambda: healthy("rabbitmq"), within=120)
    # The audit waits for every outbox to drain, then checks each event applied once.
    await assert_audit_clean(audit_dsns)


async def test_inventory_cut_off_the_network_for_5s_under_load(
    order_api: str, audit_dsns: dict[str, str]
) -> None:
    network = f"{PROJECT}_default"
    container = compose("ps", "-q", "inventory").split()[0]

    def partition() -> None:
        docker("network", "disconnect", network, container)
        time.sleep(5)
        docker("network", "connect", network, container)

    await under_load(order_api, partition)
    wait_for("inventory healthy again", lambda: healthy("inventory"), within=120)
    await assert_audit_clean(audit_dsns)


async def unfinished_orders(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE status NOT IN ($1, $2, $3)", *TERMINAL
        )
    finally:
        await conn.close()
    return count


async def test_the_order_container_restarted_with_sagas_in_flight(
    order_api: str, audit_dsns: dict[str, str]
) -> None:
    container = compose("ps", "-q", "order").split()[0]
    load = asyncio.create_task(run_load(order_api, rate=10, duration=6, seed=SEED))
    await asyncio.sleep(3)
    # --time 0: SIGKILL at once, nothing finishes gracefully; recovery must resume the sagas.
    await asyncio.to_thread(docker, "restart", "--time", "0", container)
    await load
    await asyncio.to_thread(wait_for, "order healthy again", lambda: healthy("order"), within=120)
    healthy_at = time.monotonic()
    while await unfinished_orders(audit_dsns["order"]) and time.monotonic() - healthy_at < 10:
        await asyncio.sleep(0.25)
    assert await unfinished_orders(audit_dsns["order"]) == 0, "sagas not terminal 10 s after"
    await assert_audit_clean(audit_dsns)
