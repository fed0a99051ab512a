"""Helpers for the compose suite: compose commands against the test project, ports, health.

The test project (``ordermesh-test``) runs docker-compose.yml with deploy/compose/offline.yml,
apart from a user's ``ordermesh`` stack; its fixed host ports move to free ones (PORT_VARIABLES).
"""

from __future__ import annotations

import itertools
import random
import socket
import subprocess
import time
from typing import Any

from ordermesh_deploy import compose as stack

PROJECT = "ordermesh-test"
FILES = ("docker-compose.yml", stack.OFFLINE_FILE)
# Loopback ports of the fixed published ones, chosen per run: a running `make dev` (8000) or
# `make up` stack is left alone.
PORT_VARIABLES = (
    "ORDER_PORT",
    "CONSUL_PORT",
    "CONSUL_DNS_PORT",
    "RABBITMQ_UI_PORT",
    "PROMETHEUS_PORT",
    "JAEGER_UI_PORT",
    "GRAFANA_PORT",
)


def docker_engine_available() -> bool:
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return info.returncode == 0


def docker(*args: str) -> None:
    subprocess.run(["docker", *args], check=True, capture_output=True)


# Below Linux's ephemeral range (32768-60999), where Docker's own allocator hands out the
# stack's other published ports: a port picked there could be taken by `up` before the order
# container, which starts last, publishes it.
_FIXED_PORT_RANGE = range(20000, 32000)


def fixed_host_ports(count: int) -> list[int]:
    """``count`` different ports nothing listens on (loopback or any address), outside the
    ephemeral range (unlike tests.support.etcd.free_ports, which the kernel picks in it)."""
    candidates = random.sample(_FIXED_PORT_RANGE, 200)
    free = (p for p in candidates if _bindable(p, "127.0.0.1") and _bindable(p, "0.0.0.0"))
    ports = list(itertools.islice(free, count))
    if len(ports) < count:
        raise AssertionError(f"not {count} free ports in {_FIXED_PORT_RANGE} of 200 tried")
    return ports


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def compose(*args: str, check: bool = True) -> str:
    """A compose command against the test project (output returned)."""
    command = [*stack.compose_command(), "-p", PROJECT]
    for file in FILES:
        command += ["-f", file]
    result = subprocess.run(
        [*command, *args],
        cwd=stack.ROOT,
        env=stack.compose_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"compose {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result.stdout


def host_port(service: str, port: int, *, index: int = 1) -> int:
    out = compose("port", "--index", str(index), service, str(port)).strip()
    return int(out.rsplit(":", 1)[1])


def healthy(service: str) -> list[str]:
    """The ids of the service's containers that are healthy."""
    ids = compose("ps", "-q", service).split()
    if not ids:
        return []
    fmt = "{{.Id}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
    out = subprocess.run(
        ["docker", "inspect", "-f", fmt, *ids], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.endswith(" healthy")]


def wait_for(what: str, condition: Any, *, within: float, pause: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f} s: {what}")
        time.sleep(pause)
