"""The local stack's secrets: generated once into the run directory, never a default."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from ordermesh_deploy.local import Stack, ensure_secrets, plan_instances, supervisor_conf
from ordermesh_deploy.stacks import LocalEndpoints


def test_secrets_are_generated_once_and_kept_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SERVICE_TOKEN_SECRET", "ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    first = ensure_secrets(tmp_path)
    assert set(first) == {"SERVICE_TOKEN_SECRET", "ADMIN_TOKEN"}
    assert all(len(value) >= 32 for value in first.values())
    assert ensure_secrets(tmp_path) == first
    assert stat.S_IMODE((tmp_path / "secrets.env").stat().st_mode) == 0o600
    assert ensure_secrets(tmp_path / "other") != first  # per stack, never a shared default


def test_a_secret_from_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", "chosen-by-the-operator")
    assert ensure_secrets(tmp_path)["ADMIN_TOKEN"] == "chosen-by-the-operator"


def test_every_service_gets_the_secrets_and_the_tools_find_the_admin_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    stack = Stack(str(tmp_path), "postgresql://x@127.0.0.1", "amqp://", "http://e", False)
    found = ensure_secrets(tmp_path)
    conf = supervisor_conf(stack, plan_instances({}), "INFO", found)
    programs = [part for part in conf.split("[program:") if part.startswith(("order", "pay"))]
    assert programs
    for program in programs:
        assert f'SERVICE_TOKEN_SECRET="{found["SERVICE_TOKEN_SECRET"]}"' in program
    stack.conf.write_text(conf)
    assert LocalEndpoints(stack).admin_token == found["ADMIN_TOKEN"]
