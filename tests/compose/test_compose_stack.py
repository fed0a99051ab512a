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
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from ordermesh_deploy import compose as stack
from ordermesh_deploy.audit import audit, render
from ordermesh_deploy.load import LoadResult, run_load

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

PROJECT = "ordermesh-test"
FILES = ("docker-compose.yml", stack.OFFLINE_FILE)
SEED = 14
# Loopback ports of the fixed published ones, chosen per run: a running `make dev` (8000) or
# `make up` stack is left alone.
PORT_VARIABLES = ("ORDER_PORT", "CONSUL_PORT", "RABBITMQ_UI_PORT")


def docker_engine_available() -> bool:
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return info.returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def compose(*args: str, check: bool = True) -> str:
    """A compose command against the test project (output returned)."""
    command = [*stack.compose_command(), "-p", PROJECT]
    for file in FILES:
        command += ["-f", file]
    result = subprocess.run(
        [*command, *args], cwd=stack.ROOT, capture_output=True, text=True, check=False
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


@pytest.fixture(scope="session")
def compose_env() -> Iterator[dict[str, str]]:
    """Images built, secrets in .env, fixed ports moved to free ones for this run."""
    if not docker_engine_available():
        pytest.skip("no Docker engine here (`docker info` fails): the compose suite needs one")
    subprocess.run(["bash", str(stack.BUILD_SCRIPT)], cwd=stack.ROOT, check=True)
    env = stack.ensure_env(offline=None)
    stack.write_definitions(env)
    ports = {name: str(free_port()) for name in PORT_VARIABLES}
    saved = {name: os.environ.get(name) for name in ports}
    os.environ.update(ports)
    yield env | ports
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return " ".join(stack.compose_command())


@pytest.fixture(scope="session")
def docker_compose_file() -> list[str]:
    return [str(stack.ROOT / file) for file in FILES]


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return PROJECT


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # Images come from build.sh; `--wait` is Compose v2 only, so health is polled below.
    return ["up -d --no-build"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --remove-orphans"]


@pytest.fixture(scope="session")
def order_api(compose_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    request.getfixturevalue("docker_services")
    url = f"http://127.0.0.1:{compose_env['ORDER_PORT']}"
    wait_for("the order service healthy", lambda: healthy("order"), within=300, pause=2)
    return url


@pytest.fixture
def audit_dsns(compose_env: dict[str, str]) -> dict[str, str]:
    port = host_port("postgres", 5432)
    password = compose_env["AUDIT_DB_PASSWORD"]
    return {
        service: f"postgresql://ordermesh_audit:{password}@127.0.0.1:{port}/ordermesh_{service}"
        for service in stack.SERVICES
    }


def place(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{url}/orders", json=body, timeout=30)
    assert response.status_code in (201, 202), response.text
    order: dict[str, Any] = response.json()
    deadline = time.monotonic() + 60
    while order["status"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.5)
        order = httpx.get(f"{url}/orders/{order['id']}", timeout=10).json()
    return order


async def assert_audit_clean(dsns: dict[str, str]) -> None:
    findings = await audit(dsns, within=90)
    assert all(f.ok for f in findings), "\n" + render(findings)


async def under_load(url: str, fault: Any, *, duration: float = 16, rate: float = 8) -> LoadResult:
    """Run ``fault`` (a blocking function) in a thread while orders arrive at ``rate``/s."""
    load = asyncio.create_task(run_load(url, rate=rate, duration=duration, seed=SEED))
    await asyncio.sleep(3)
    await asyncio.to_thread(fault)
    result = await load
    assert result.sent and result.order_ids, f"no order was accepted: {result.errors}"
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
    for n in range(12):
        place(
            order_api,
            {"customer_id": "carol", "items": [{"sku": "MS-202", "quantity": 1}], "destination": "DE"},
        )
        del n
    calls = [_payment_calls(i) - b for i, b in zip((1, 2, 3), before, strict=True)]
    assert all(c > 0 for c in calls), f"charges per replica: {calls}"


async def test_a_killed_payment_replica_under_load_leaves_the_books_balanced(
    order_api: str, audit_dsns: dict[str, str]
) -> None:
    victim = compose("ps", "-q", "payment").split()[0]

    def kill() -> None:
        subprocess.run(["docker", "kill", "--signal", "KILL", victim], check=True)

    result = await under_load(order_api, kill)
    # restart: unless-stopped does not apply to a kill; bring the replica back as an operator would.
    subprocess.run(["docker", "start", victim], check=True, capture_output=True)
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
        subprocess.run(["docker", "network", "disconnect", network, container], check=True)
        time.sleep(5)
        subprocess.run(["docker", "network", "connect", network, container], check=True)

    await under_load(order_api, partition)
    wait_for("inventory healthy again", lambda: healthy("inventory"), within=120)
    await assert_audit_clean(audit_dsns)


async def test_the_order_container_restarted_with_sagas_in_flight(
    order_api: str, audit_dsns: dict[str, str]
) -> None:
    container = compose("ps", "-q", "order").split()[0]
    load = asyncio.create_task(run_load(order_api, rate=10, duration=6, seed=SEED))
    await asyncio.sleep(3)
    # SIGKILL: nothing is finished gracefully; recovery must pick the sagas up.
    await asyncio.to_thread(
        subprocess.run, ["docker", "restart", "--time", "0", container], check=True
    )
    await load
    await asyncio.to_thread(
        wait_for, "order healthy again", lambda: healthy("order"), within=120
    )
    healthy_at = time.monotonic()
    await assert_audit_clean(audit_dsns)
    # Every saga terminal within 10 s of the restarted order service turning healthy.
    assert time.monotonic() - healthy_at < 10 + 5, "sagas took longer than 10 s to finish"
