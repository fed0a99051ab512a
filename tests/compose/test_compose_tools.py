"""The tools on the compose stack, as a person runs them after `make up`: no port copied by hand.

Each tool runs as its command line, pointed at the test project the way compose itself is
(``COMPOSE_PROJECT_NAME`` and ``COMPOSE_FILE`` override ``.env``): status lists every replica;
chaos kills one payment replica of three, cuts PostgreSQL from everyone and heals it (its DNS
name still answers), injects a fault with the stack's own admin token; load, audit and the
event tail find their ports; reset wipes the data and starts the stack again as scaled.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from ordermesh_deploy import compose as stack

from tests.support.compose import FILES, PROJECT, compose, healthy, host_port, wait_for
from tests.support.orders import place

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

README_ORDER = {
    "customer_id": "alice",
    "items": [{"sku": "KB-101", "quantity": 2}],
    "destination": "DE",
}


def tool_environment() -> dict[str, str]:
    """The test project in place of .env's, and no registry probe: `reset` restarts the stack
    from the images built here, whatever Docker Hub answers."""
    test_project = {"COMPOSE_PROJECT_NAME": PROJECT, "COMPOSE_FILE": ":".join(FILES)}
    return os.environ | test_project | {"ORDERMESH_OFFLINE": "1"}


def tool(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m ordermesh_deploy.<module> --target compose ...`` on the test project."""
    return subprocess.run(
        [sys.executable, "-m", f"ordermesh_deploy.{module}", "--target", "compose", *args],
        cwd=stack.ROOT,
        env=tool_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def started_at() -> dict[str, str]:
    """payment container id -> when it last started."""
    ids = compose("ps", "-q", "payment").split()
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.Id}} {{.State.StartedAt}}", *ids],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split() for line in out.splitlines())


@pytest.fixture(scope="module")
def three_payments(order_api: str) -> str:
    compose("up", "-d", "--no-build", "--no-recreate", "--scale", "payment=3")
    wait_for("3 healthy payment replicas", lambda: len(healthy("payment")) == 3, within=120)
    return order_api


def test_status_lists_every_replica_with_its_port(three_payments: str) -> None:
    result = tool("stacks", "status")
    assert result.returncode == 0, result.stderr
    assert f"compose stack (project {PROJECT})" in result.stdout
    for index in (1, 2, 3):
        assert f"127.0.0.1:{host_port('payment', 8000, index=index)}->8000" in result.stdout


def test_killing_payment_kills_one_replica_of_three(three_payments: str) -> None:
    before = started_at()
    result = tool("chaos", "kill", "payment", "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert "payment is payment-" in result.stdout
    wait_for("3 healthy payment replicas", lambda: len(healthy("payment")) == 3, within=120)
    after = started_at()
    assert after.keys() == before.keys()
    restarted = [cid for cid in before if after[cid] != before[cid]]
    assert len(restarted) == 1, f"restarted: {restarted}"


def test_postgres_partitioned_and_healed_keeps_its_name(three_payments: str) -> None:
    result = tool("chaos", "partition", "postgres", "--for", "3")
    assert result.returncode == 0, result.stderr
    assert "healed postgres <-> all" in result.stdout
    # The services reach the database by its compose name again: orders complete.
    wait_for("the order service healthy", lambda: healthy("order"), within=60)
    order = place(three_payments, {**README_ORDER, "items": [{"sku": "MS-202", "quantity": 1}]})
    assert order["status"] == "completed", order


def test_a_fault_is_set_with_the_stacks_own_admin_token(three_payments: str) -> None:
    result = tool("chaos", "fault", "payment-2", "--latency-ms", "150")
    assert result.returncode == 0, result.stderr
    url = f"http://127.0.0.1:{host_port('payment', 8000, index=2)}/admin/faults"
    headers = {"X-Admin-Token": stack.read_env()["ADMIN_TOKEN"]}
    assert httpx.get(url, headers=headers, timeout=5).json()["latency_ms"] == 150
    assert tool("chaos", "fault", "payment-2", "--clear").returncode == 0
    assert httpx.get(url, headers=headers, timeout=5).json()["latency_ms"] == 0


def test_load_audit_and_the_event_tail_find_the_stack(three_payments: str) -> None:
    load = tool("load", "--rate", "4", "--duration", "3")
    assert load.returncode == 0, load.stderr
    assert "final statuses:" in load.stdout
    audit = tool("audit", "--timeout", "60")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    command = [sys.executable, "-m", "ordermesh_deploy.events", "--target", "compose"]
    with subprocess.Popen(
        [*command, "--count", "1", "order.created"],
        cwd=stack.ROOT,
        env=tool_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as tail:
        try:
            # The tail says "tailing ..." once its queue is bound: the order is placed after.
            assert tail.stderr is not None
            said = [tail.stderr.readline()]
            while said[-1] and not said[-1].startswith("tailing "):
                said.append(tail.stderr.readline())
            assert said[-1], "the tail ended before it was ready:\n" + "".join(said)
            place(three_payments, {**README_ORDER, "items": [{"sku": "CB-404", "quantity": 1}]})
            out, err = tail.communicate(timeout=30)
        finally:
            tail.kill()
    assert tail.returncode == 0, err
    assert "order.created" in out


def test_reset_wipes_the_data_and_starts_the_stack_again_as_scaled(three_payments: str) -> None:
    place(three_payments, README_ORDER)
    result = tool("stacks", "reset", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert httpx.get(f"{three_payments}/orders", timeout=10).json()["orders"] == []
    assert len(healthy("payment")) == 3
    order = place(three_payments, README_ORDER)
    assert order["status"] == "completed", order
