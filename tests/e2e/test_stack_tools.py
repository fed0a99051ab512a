"""The stack tools on the local stack, as a person runs them: status, audit, load and chaos
find the stack with no port given; a service's name kills one of its instances; `make reset`
brings the README's first order back after the keyboards ran out."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.orders import place
from tests.support.stack import FAST_SETTINGS, RunningStack, start_stack, stop_stack

pytestmark = pytest.mark.e2e

README_ORDER = {
    "customer_id": "alice",
    "items": [{"sku": "KB-101", "quantity": 2}],
    "destination": "DE",
}


@pytest.fixture(scope="module")
def tools_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(
        tmp_path_factory.mktemp("tools") / "run",
        offset=25000,
        settings=FAST_SETTINGS,
        extra=("--scale", "payment=2"),
    )
    yield running
    stop_stack(running)


def tool(running: RunningStack, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m <module> --target local --run-dir <the stack's> ...``."""
    target = ["--target", "local", "--run-dir", str(running.run_dir)]
    return subprocess.run(
        [sys.executable, "-m", module, *target, *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, **FAST_SETTINGS},
    )


def payment_pids(running: RunningStack) -> dict[str, str]:
    lines = running.local("status").stdout.splitlines()
    parts = [line.split() for line in lines if line.startswith("payment-")]
    return {p[0]: p[3].rstrip(",") for p in parts if p[1] == "RUNNING"}


def keyboards_available(running: RunningStack) -> int:
    product = httpx.get(f"{running.url('inventory')}/products/KB-101", timeout=10).json()
    available: int = product["available"]
    return available


def test_status_shows_the_local_stack_and_where_its_order_api_is(
    tools_stack: RunningStack,
) -> None:
    result = tool(tools_stack, "ordermesh_deploy.stacks", "status")
    assert result.returncode == 0, result.stderr
    assert "local stack" in result.stdout
    assert "payment-2" in result.stdout
    assert f"order API: {tools_stack.url('order')}" in result.stdout


def test_load_and_audit_find_the_stack_with_no_port_given(tools_stack: RunningStack) -> None:
    load = tool(tools_stack, "ordermesh_deploy.load", "--rate", "5", "--duration", "2")
    assert load.returncode == 0, load.stderr
    assert f"order API at {tools_stack.url('order')}" in load.stderr
    assert "final statuses:" in load.stdout
    audit = tool(tools_stack, "ordermesh_deploy.audit", "--timeout", "30")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "VIOLATED" not in audit.stdout


def test_killing_a_service_by_name_kills_one_of_its_instances(tools_stack: RunningStack) -> None:
    before = payment_pids(tools_stack)
    assert len(before) == 2, before
    result = tool(tools_stack, "ordermesh_deploy.chaos", "kill", "payment", "--seed", "5")
    assert result.returncode == 0, result.stderr
    victim = next(name for name in before if f"payment is {name}" in result.stdout)
    deadline = time.monotonic() + 20
    after = payment_pids(tools_stack)
    while (set(after) != set(before) or after[victim] == before[victim]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
        after = payment_pids(tools_stack)
    assert after[victim] != before[victim], "the instance picked was not killed"
    survivors = set(before) - {victim}
    assert {n: after[n] for n in survivors} == {n: before[n] for n in survivors}


def test_reset_brings_back_the_demo_data_the_readme_examples_need(
    tools_stack: RunningStack,
) -> None:
    url = tools_stack.url("order")
    # All keyboards but one sold (as after enough load): the README's order for two is refused.
    left = keyboards_available(tools_stack)
    sold = place(
        url,
        {**README_ORDER, "items": [{"sku": "KB-101", "quantity": left - 1}]},
        within=30,
        pause=0.2,
    )
    assert sold["status"] == "completed", sold
    refused = place(url, README_ORDER, within=30, pause=0.2)
    assert refused["status"] == "cancelled", refused
    assert refused["failure_reason"].startswith("out_of_stock")

    result = tool(tools_stack, "ordermesh_deploy.stacks", "reset", "--timeout", "90")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every service is ready" in result.stdout

    assert httpx.get(f"{url}/orders", timeout=10).json()["orders"] == []
    order = place(url, README_ORDER, within=30, pause=0.2)
    assert order["status"] == "completed", order
    assert order["total"] == "178.00"
    assert keyboards_available(tools_stack) == 500 - 2
