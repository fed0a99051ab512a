"""The whole local stack for end-to-end and chaos tests: real processes under supervisord,
on ports and databases of its own, so a developer's `make dev` stack is left alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from ordermesh_deploy.local import SERVICES, Stack, port_in_use

from tests.support.postgres import admin_dsn

E2E_PORT_OFFSET = 22000
TERMINAL = ("completed", "cancelled", "compensation_failed")


@dataclass
class RunningStack:
    """A started stack: where its services listen and how to reach its databases."""

    run_dir: Path
    stack: Stack
    db_prefix: str

    def url(self, service: str, instance: int = 1) -> str:
        """Base URL of an instance."""
        return self.stack.instances[f"{service}-{instance}"]

    def database_url(self, service: str) -> str:
        """DSN of a service's database (for checks the APIs cannot show)."""
        return f"{self.stack.postgres_url}/{self.db_prefix}_{service}"

    def local(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``ordermesh-local`` against this stack."""
        return run_local(self.run_dir, *args)


def run_local(
    run_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m ordermesh_deploy.local --run-dir run_dir ...``."""
    return subprocess.run(
        [sys.executable, "-m", "ordermesh_deploy.local", "--run-dir", str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )


def free_offset(preferred: int) -> int:
    """``preferred``, or the next offset (in steps of 100) whose service ports are all free,
    so a test stack never trips over another stack running on this machine."""
    for offset in range(preferred, preferred + 5000, 100):
        ports = [base + offset + step for base in SERVICES.values() for step in (0, 10, 20)]
        if not any(port_in_use(port) for port in ports):
            return offset
    raise RuntimeError(f"no free port range near offset {preferred}")


def start_stack(
    run_dir: Path, *, offset: int, settings: dict[str, str], extra: tuple[str, ...] = ()
) -> RunningStack:
    """Bring a stack up (fails the test with its output if it does not get ready)."""
    offset = free_offset(offset)
    prefix = f"om_e2e_{uuid.uuid4().hex[:8]}"
    server = admin_dsn().rpartition("/")[0]
    env = {**os.environ, **settings}
    result = run_local(
        run_dir,
        "up",
        "--port-offset",
        str(offset),
        "--db-prefix",
        prefix,
        "--rabbitmq-vhost",
        prefix,
        "--postgres-url",
        server,
        "--timeout",
        "90",
        *extra,
        env=env,
    )
    if result.returncode != 0:
        run_local(run_dir, "down")
        pytest.fail(f"the local stack did not start:\n{result.stdout}\n{result.stderr}")
    stack = Stack.load(run_dir)
    assert stack is not None
    return RunningStack(run_dir, stack, prefix)


def stop_stack(running: RunningStack) -> None:
    """Stop the stack and drop its databases."""
    running.local("down")
    asyncio.run(_drop(running))


async def _drop(running: RunningStack) -> None:
    conn = await asyncpg.connect(admin_dsn())
    try:
        for service in SERVICES:
            await conn.execute(
                f'DROP DATABASE IF EXISTS "{running.db_prefix}_{service}" WITH (FORCE)'
            )
    finally:
        await conn.close()


# Small pools: test stacks share the machine's Postgres (100 connections) with other tests.
FAST_SETTINGS = {
    "ORDER_WAIT": "5",
    "SAGA_DEADLINE": "8",
    "SAGA_STEP_TIMEOUT": "2",
    "DB_POOL_MAX": "4",
}


@pytest.fixture(scope="module")
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """One stack shared by a module's end-to-end tests (they use distinct orders), stopped
    when the module is done so its connections are free for the tests after it."""
    running = start_stack(
        tmp_path_factory.mktemp("stack") / "run", offset=E2E_PORT_OFFSET, settings=FAST_SETTINGS
    )
    yield running
    stop_stack(running)


async def wait_terminal(
    client: httpx.AsyncClient, order_url: str, order_id: str, within: float = 30
) -> dict[str, Any]:
    """Poll an order until its saga has ended."""
    async with asyncio.timeout(within):
        while True:
            order: dict[str, Any] = (await client.get(f"{order_url}/orders/{order_id}")).json()
            if order["status"] in TERMINAL:
                return order
            await asyncio.sleep(0.1)
