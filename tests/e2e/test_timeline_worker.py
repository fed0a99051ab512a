"""``ordermesh-local up --timeline-worker``: the timeline consumer runs as a process of its
own; the order instance consumes no timeline, yet every order's timeline fills."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_local_stack import local, program_pids
from tests.support.postgres import drop_database

pytestmark = pytest.mark.e2e

OFFSET = 23000  # away from the default ports and the other e2e stacks
PREFIX = f"om_tw_{uuid.uuid4().hex[:8]}"
ORDER = f"http://127.0.0.1:{8000 + OFFSET}"


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[Path]:
    run_dir = tmp_path / "run"
    yield run_dir
    local(run_dir, "down")
    asyncio.run(_drop_databases())


async def _drop_databases() -> None:
    for service in ("order", "inventory", "payment", "shipping"):
        await drop_database(f"{PREFIX}_{service}")


async def test_the_timeline_fills_from_a_worker_of_its_own(stack_dir: Path) -> None:
    options = ["--port-offset", str(OFFSET), "--db-prefix", PREFIX, "--rabbitmq-vhost", PREFIX]
    up = local(stack_dir, "up", "--timeline-worker", *options)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "order-timeline" in program_pids(stack_dir)
    async with httpx.AsyncClient(timeout=10) as client:
        ready = (await client.get(f"{ORDER}/health/ready")).json()
        loops = set(ready["details"]["background"])
        assert "consumer:order.timeline" not in loops  # the order instance consumes none
        assert "consumer:order.catalogue" in loops
        placed = await client.post(
            f"{ORDER}/orders",
            json={
                "customer_id": "alice",
                "items": [{"sku": "KB-101", "quantity": 1}],
                "destination": "DE",
            },
        )
        assert placed.status_code == 201, placed.text
        order_id = placed.json()["id"]
        async with asyncio.timeout(20):
            while True:
                timeline = (await client.get(f"{ORDER}/orders/{order_id}/timeline")).json()
                types = {entry["event_type"] for entry in timeline}
                if {"stock_reserved", "charged", "shipment_created"} <= types:
                    break
                await asyncio.sleep(0.2)
