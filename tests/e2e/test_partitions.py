"""Partitions on the local stack, as a person makes them: `ordermesh-chaos partition order
inventory` leaves order unable to reach inventory while everyone else still can, and `heal`
gives it back with the packet filters as they were. Needs root (iptables and cgroups), as CI
and the developers' machines have."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from ordermesh_deploy.partition_local import LocalCutter, cgroup2_root

from tests.support.orders import place
from tests.support.stack import FAST_SETTINGS, RunningStack, start_stack, stop_stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="partitions change packet filters: root only"),
]

ORDER = {"customer_id": "alice", "items": [{"sku": "MS-202", "quantity": 1}], "destination": "DE"}
PROBE = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=1.5)"


@pytest.fixture(scope="module")
def cut_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(
        tmp_path_factory.mktemp("partitions") / "run", offset=26000, settings=FAST_SETTINGS
    )
    yield running
    chaos(running, "heal")  # a failed test must not leave its cut on the machine
    stop_stack(running)


def chaos_command(running: RunningStack, *args: str) -> list[str]:
    command = [sys.executable, "-m", "ordermesh_deploy.chaos", "--target", "local"]
    return [*command, "--run-dir", str(running.run_dir), *args]


def chaos(running: RunningStack, *args: str) -> subprocess.CompletedProcess[str]:
    command = chaos_command(running, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def rules() -> str:
    """The host's OUTPUT chain and every chain there is (Docker's come and go elsewhere)."""
    listed = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True)
    return "\n".join(
        line for line in listed.stdout.splitlines() if line.startswith(("-N", "-A OUTPUT"))
    )


def port(running: RunningStack, service: str) -> int:
    return int(running.url(service).rsplit(":", 1)[1])


def group(running: RunningStack, program: str) -> Path:
    return cgroup2_root() / "ordermesh-chaos" / LocalCutter(running.stack).key / program


def reaches_from(running: RunningStack, program: str, service: str) -> bool:
    """Whether a new connection made from ``program``'s cgroup reaches ``service``."""
    procs = group(running, program) / "cgroup.procs"
    script = f'echo $$ > {procs} && exec {sys.executable} -c "{PROBE}" {port(running, service)}'
    return subprocess.run(["sh", "-c", script], capture_output=True, check=False).returncode == 0


def test_order_cut_from_inventory_then_healed(cut_stack: RunningStack) -> None:
    before = rules()
    result = chaos(cut_stack, "partition", "order", "inventory")
    assert result.returncode == 0, result.stderr
    assert "order <-> inventory" in chaos(cut_stack, "partitions").stdout
    # The order service's own call: the reservation never gets through.
    order = place(cut_stack.url("order"), ORDER, within=3)
    assert order["status"] == "pending", order
    assert order["steps"][0]["status"] != "succeeded", order
    # Only that pair: order still reaches payment; inventory answers everyone else.
    assert not reaches_from(cut_stack, "order-1", "inventory")
    assert reaches_from(cut_stack, "order-1", "payment")
    assert httpx.get(f"{cut_stack.url('inventory')}/health/live", timeout=3).status_code == 200

    healed = chaos(cut_stack, "heal")
    assert healed.returncode == 0, healed.stderr
    assert "healed order <-> inventory" in healed.stdout
    assert rules() == before
    assert not group(cut_stack, "order-1").exists()
    assert place(cut_stack.url("order"), ORDER)["status"] == "completed"


def test_a_restarted_instance_stays_cut_while_the_cut_is_held(cut_stack: RunningStack) -> None:
    command = chaos_command(cut_stack, "partition", "order", "inventory", "--for", "12")
    held = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "order <-> inventory" in chaos(cut_stack, "partitions").stdout)
        assert cut_stack.local("restart", "order-1").returncode == 0
        pid = supervised_pid(cut_stack, "order-1")
        wait_until(lambda: str(pid) in (group(cut_stack, "order-1") / "cgroup.procs").read_text())
        assert not reaches_from(cut_stack, "order-1", "inventory")
    finally:
        out, _ = held.communicate(timeout=60)
    assert "healed order <-> inventory" in out
    assert not group(cut_stack, "order-1").exists()


def test_an_unknown_component_is_named_with_the_ones_there_are(cut_stack: RunningStack) -> None:
    result = chaos(cut_stack, "partition", "order", "inventry")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "inventry: not a component of the local stack; try inventory, order, payment, shipping,"
        " order-1, inventory-1, payment-1, shipping-1, postgres, rabbitmq, etcd (and `all` for B)"
    ]


def supervised_pid(running: RunningStack, program: str) -> int:
    status = running.local("status").stdout
    line = next(line for line in status.splitlines() if line.startswith(program))
    return int(line.split("pid ")[1].split(",")[0])


def wait_until(condition: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass  # the cgroup is not there yet
        time.sleep(0.2)
    raise AssertionError("not within the time given")
