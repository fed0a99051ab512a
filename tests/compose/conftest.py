"""Fixtures of the compose suite: images, secrets, the stack (pytest-docker), the auditor's DSNs.

The stack starts once per test module (pyproject's `--container-scope=module`) and is
torn down, volumes included, when the module is done: never left running under the rest
of the suite. After the
run a line gives the compose suite's own counts, so CI's output shows them apart.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from ordermesh_deploy import compose as stack

from tests.support.compose import (
    FILES,
    PORT_VARIABLES,
    PROJECT,
    docker_engine_available,
    fixed_host_ports,
    healthy,
    host_port,
    wait_for,
)


@pytest.fixture(scope="session")
def compose_env() -> Iterator[dict[str, str]]:
    """Images built, secrets in .env, fixed ports moved to free ones for this run."""
    if not docker_engine_available():
        pytest.skip("no Docker engine here (`docker info` fails): the compose suite needs one")
    subprocess.run(["bash", str(stack.BUILD_SCRIPT)], cwd=stack.ROOT, check=True)
    env = stack.ensure_env(offline=None)
    stack.write_definitions(env)
    chosen = fixed_host_ports(len(PORT_VARIABLES))
    ports = {name: str(port) for name, port in zip(PORT_VARIABLES, chosen, strict=True)}
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
    # pytest-docker runs this through a shell with the test's environment, which holds a
    # SERVICE_TOKEN_SECRET of the test's own (tests/conftest.py): .env's must win.
    unset = " ".join(f"-u {name}" for name in stack.SECRET_NAMES)
    return f"env {unset} " + " ".join(stack.compose_command())


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


@pytest.fixture(scope="module")
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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    def count(outcome: str) -> int:
        reports = terminalreporter.getreports(outcome)
        return sum(report.nodeid.startswith("tests/compose/") for report in reports)

    counts = {outcome: count(outcome) for outcome in ("passed", "failed", "error", "skipped")}
    if any(counts.values()):
        summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
        terminalreporter.write_line(f"compose suite (tests/compose): {summary}")
