"""The coordination demos end to end (what `make demo-election` / `make demo-lock` run)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.etcd import etcd_binary
from tests.support.postgres import admin_dsn

pytestmark = pytest.mark.integration

DEMO = [sys.executable, "-m", "ordermesh_deploy.coordination_demo"]


def require_etcd() -> None:
    if not etcd_binary().is_file():
        pytest.skip(f"etcd not installed at {etcd_binary()} (apt install etcd-server)")


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=60, check=False)


def test_help_lists_both_demos() -> None:
    result = run_demo("--help")

    assert result.returncode == 0
    assert "election" in result.stdout
    assert "lock" in result.stdout
    assert "_worker" not in result.stdout  # internal subcommands stay hidden


def test_nonsensical_options_are_refused() -> None:
    result = run_demo("election", "--contenders", "2", "--kills", "2")

    assert result.returncode == 2
    assert "--kills must be at least 1 and fewer than --contenders" in result.stderr


def test_election_demo_shows_takeovers_and_succeeds() -> None:
    require_etcd()
    result = run_demo("election", "--ttl", "1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("took over") == 2
    assert "who led when:" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("OK:")


def test_lock_demo_shows_fenced_late_write_and_succeeds() -> None:
    require_etcd()
    result = run_demo("lock", "--ttl", "1", "--database-url", admin_dsn())

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SIGSTOP" in result.stdout
    assert "REJECTED" in result.stdout
    assert "the ledger (Postgres) holds" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("OK:")


def test_lock_demo_without_postgres_fails_with_advice() -> None:
    result = run_demo("lock", "--ttl", "1", "--database-url", "postgresql://postgres@127.0.0.1:9/x")

    assert result.returncode == 1
    assert "cannot reach Postgres" in result.stdout
    assert "--database-url" in result.stdout
