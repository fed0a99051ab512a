"""The local stack as a newcomer runs it: up, every service ready and registered, a killed
process comes back, down stops everything it started."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ordermesh_deploy.local import Stack
from ordermesh_shared.discovery.etcd import EtcdRegistry

from tests.support.postgres import drop_database

pytestmark = pytest.mark.e2e

OFFSET = 21000  # away from the default ports, so a developer's own `make dev` is left alone
PREFIX = f"om_e2e_{uuid.uuid4().hex[:8]}"  # and away from its databases and broker


def local(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ordermesh_deploy.local", "--run-dir", str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def program_pids(run_dir: Path) -> dict[str, int]:
    out = local(run_dir, "status").stdout
    pids = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "RUNNING":
            pids[parts[0]] = int(parts[3].rstrip(","))
    return pids


async def ready(url: str, within: float = 30.0) -> None:
    async with httpx.AsyncClient(timeout=2) as client, asyncio.timeout(within):
        while True:
            try:
                if (await client.get(f"{url}/health/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[Path]:
    run_dir = tmp_path / "run"
    yield run_dir
    local(run_dir, "down")
    asyncio.run(drop_databases())


async def drop_databases() -> None:
    for service in ("order", "inventory", "payment", "shipping"):
        await drop_database(f"{PREFIX}_{service}")


async def test_up_registers_recovers_and_down_stops_everything(stack_dir: Path) -> None:
    up = local(
        stack_dir,
        "up",
        "--port-offset",
        str(OFFSET),
        "--timeout",
        "60",
        "--db-prefix",
        PREFIX,
        "--rabbitmq-vhost",
        PREFIX,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    assert "every service is ready" in up.stdout
    stack = Stack.load(stack_dir)
    assert stack is not None
    order_url = f"http://127.0.0.1:{8000 + OFFSET}"
    async with httpx.AsyncClient() as client:
        body = (await client.get(f"{order_url}/health/ready")).json()
    assert body["status"] == "ok"
    assert set(body["checks"].values()) == {"ok"}
    assert {"database", "rabbitmq", "registry"} <= set(body["checks"])

    # Ready instances announce themselves on their next presence tick (every second).
    async with EtcdRegistry(stack.etcd_url) as registry, asyncio.timeout(5):
        for service, port in {
            "order": 8000,
            "inventory": 8001,
            "payment": 8002,
            "shipping": 8003,
        }.items():
            await registry.watch(service)
            while not registry.instances(service):
                await asyncio.sleep(0.1)
            assert [i.port for i in registry.instances(service)] == [port + OFFSET]

    pids = program_pids(stack_dir)
    assert set(pids) == {"etcd", "order-1", "inventory-1", "payment-1", "shipping-1"}
    assert local(stack_dir, "signal", "KILL", "payment-1").returncode == 0
    await ready(f"http://127.0.0.1:{8002 + OFFSET}")
    assert program_pids(stack_dir)["payment-1"] != pids["payment-1"]

    all_pids = program_pids(stack_dir)
    down = local(stack_dir, "down")
    assert down.returncode == 0
    assert not [p for p, pid in all_pids.items() if pid_alive(pid)]


def test_up_refuses_busy_ports(stack_dir: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 8001 + OFFSET + 5))
        sock.listen()
        result = local(stack_dir, "up", "--port-offset", str(OFFSET + 5))
    assert result.returncode == 1
    assert "inventory-1 (port 29006)" in result.stdout
