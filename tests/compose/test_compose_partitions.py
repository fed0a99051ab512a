"""Partitions on the compose stack: `ordermesh-chaos partition order inventory` cuts exactly
that pair of containers (payment still reaches inventory, order still reaches payment), and
`heal` leaves each container's packet filters as they were. Needs root, for nsenter."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.compose.test_compose_tools import tool
from tests.support.compose import compose

pytestmark = [
    pytest.mark.compose,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="partitions enter containers' namespaces: root"),
]

# Run by the service's own interpreter: the images need nothing added for partitions.
PROBE = "import socket, sys; socket.create_connection((sys.argv[1], 8000), timeout=2)"


def container(service: str) -> str:
    return compose("ps", "-q", service).split()[0]


def reaches(source: str, destination: str) -> bool:
    """Whether ``source``'s container opens a connection to ``destination``'s port 8000."""
    probe = ["docker", "exec", container(source), "python3", "-c", PROBE, destination]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def filters(service: str) -> str:
    """The filter table inside ``service``'s container, read from the host."""
    pid = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Pid}}", container(service)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    listed = ["nsenter", "-t", pid, "-n", "iptables", "-w", "-S"]
    return subprocess.run(listed, capture_output=True, text=True, check=True).stdout


def test_order_cut_from_inventory_only_then_healed(order_api: str) -> None:
    before = {service: filters(service) for service in ("order", "inventory")}
    assert reaches("order", "inventory")

    result = tool("chaos", "partition", "order", "inventory")
    assert result.returncode == 0, result.stderr
    assert "order <-> inventory" in tool("chaos", "partitions").stdout
    assert not reaches("order", "inventory")
    assert not reaches("inventory", "order")
    assert reaches("payment", "inventory")
    assert reaches("order", "payment")

    healed = tool("chaos", "heal", "order", "inventory")
    assert healed.returncode == 0, healed.stderr
    assert "healed order <-> inventory" in healed.stdout
    assert {service: filters(service) for service in before} == before
    assert reaches("order", "inventory")
