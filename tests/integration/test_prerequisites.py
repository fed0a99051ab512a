"""What a machine without the platform's prerequisites is told: the missing piece and the
command that fixes it, in one line, within seconds (never after the 60 s readiness wait)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ordermesh_deploy.local import SERVICES, supervisord_running

from tests.support.etcd import free_port
from tests.support.postgres import drop_database
from tests.support.stack import free_offset, run_local

pytestmark = pytest.mark.integration

PREREQS = Path(__file__).resolve().parents[2] / "deploy" / "local" / "prereqs.sh"
NOBODY = 65534
WITHIN = 5.0  # seconds


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """A run dir for `ordermesh-local up`; whatever it started is stopped afterwards."""
    run = tmp_path / "run"
    yield run
    run_local(run, "down")


@pytest.fixture
def db_prefix() -> Iterator[str]:
    """A database prefix of this test's own (databases a failed `up` left are dropped)."""
    prefix = f"om_pre_{uuid.uuid4().hex[:8]}"
    yield prefix
    for service in SERVICES:
        asyncio.run(drop_database(f"{prefix}_{service}"))


def timed_up(run_dir: Path, db_prefix: str, *args: str, env: dict[str, str]) -> tuple[str, float]:
    """Run `ordermesh-local up` (a 3 s readiness wait at most); its output and duration."""
    started = time.monotonic()
    result = run_local(
        run_dir,
        "up",
        *("--port-offset", str(free_offset(24000)), "--db-prefix", db_prefix, "--timeout", "3"),
        *args,
        env={**os.environ, **env},
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout
    return result.stdout + result.stderr, elapsed


def lines_about(output: str, word: str) -> list[str]:
    return [line for line in output.splitlines() if word in line]


def test_up_without_etcd_names_it_and_the_install_command(
    run_dir: Path, db_prefix: str, tmp_path: Path
) -> None:
    output, elapsed = timed_up(
        run_dir, db_prefix, env={"ETCD_BINARY": str(tmp_path / "no-etcd-here")}
    )

    assert elapsed < WITHIN
    [line] = lines_about(output, "etcd")
    assert "apt-get install etcd-server" in line
    assert "started" not in output
    assert not supervisord_running(run_dir)


def test_up_without_rabbitmq_names_it_and_how_to_start_it(run_dir: Path, db_prefix: str) -> None:
    silent = f"amqp://guest:guest@127.0.0.1:{free_port()}/"

    output, elapsed = timed_up(run_dir, db_prefix, "--rabbitmq-url", silent, env={})

    assert elapsed < WITHIN
    [line] = lines_about(output, "RabbitMQ")
    assert "rabbitmq-server -detached" in line
    assert not supervisord_running(run_dir)


@dataclass
class BareMachine:
    """The script and a PATH directory with only what it runs before its first check, and
    apt-get (a Debian machine). In /tmp, readable by nobody: pytest's tmp dirs and the
    checkout may be root's alone."""

    script: Path
    path: Path

    def run(self, *prefix: str) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = subprocess.run(
            [*prefix, str(self.script)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={"PATH": str(self.path), "HOME": "/nonexistent", "LANG": "C.UTF-8"},
        )
        return result, time.monotonic() - started


@pytest.fixture
def bare_machine() -> Iterator[BareMachine]:
    base = Path(tempfile.mkdtemp(prefix="om-bare-"))
    base.chmod(0o755)
    machine = BareMachine(script=base / "prereqs.sh", path=base / "bin")
    shutil.copy(PREREQS, machine.script)
    machine.path.mkdir()
    for tool in ("bash", "dirname", "apt-get"):
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed for this test"
        (machine.path / tool).symlink_to(found)
    yield machine
    shutil.rmtree(base)


def as_nobody() -> list[str]:
    """The command prefix that drops root (none when the tests do not run as root)."""
    if os.geteuid() != 0:
        return []  # already not root
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def test_prereqs_as_non_root_names_what_is_missing_and_the_command(
    bare_machine: BareMachine,
) -> None:
    result, elapsed = bare_machine.run(*as_nobody())

    assert result.returncode != 0
    assert elapsed < WITHIN
    [line] = (result.stdout + result.stderr).splitlines()
    assert "missing" in line
    assert "etcd-server" in line
    assert "run as root: apt-get install -y" in line


def test_prereqs_without_apt_get_names_what_is_missing(bare_machine: BareMachine) -> None:
    (bare_machine.path / "apt-get").unlink()  # not Debian: nothing to install with, even as root

    result, elapsed = bare_machine.run()

    assert result.returncode != 0
    assert elapsed < WITHIN
    [line] = (result.stdout + result.stderr).splitlines()
    assert "etcd-server" in line
    assert "package manager" in line
