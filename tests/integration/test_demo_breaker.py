"""`make demo-breaker` shows what it promises: the breaker opens under the fault and closes."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_breaker_opens_and_closes_the_breaker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ordermesh_deploy.demo_breaker"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed fast, nothing sent" in result.stdout
    assert "half-open -> closed" in result.stdout


def test_demo_breaker_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ordermesh_deploy.demo_breaker", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert "--stack" in result.stdout
