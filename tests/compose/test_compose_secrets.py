"""The stack's secrets come from .env, and only from there.

`make up` with the secrets gone but the data kept says so in one line and starts nothing: a
fresh .env holds fresh passwords, which would not open databases and a broker initialised
with the old ones (every service then fails to log in and never turns healthy).

A secret in the shell does not reach the containers: compose prefers the shell's variable to
.env's, so a replica started from a shell that holds one would distrust the rest of the stack.
"""

from __future__ import annotations

import argparse
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from ordermesh_deploy import compose as stack

from tests.support.compose import docker_engine_available

pytestmark = pytest.mark.compose


@pytest.fixture
def orphan_volume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    if not docker_engine_available():
        pytest.skip("no Docker engine here (`docker info` fails)")
    project = f"omtest{uuid.uuid4().hex[:8]}"
    name = f"{project}_postgres-data"
    label = f"com.docker.compose.project={project}"
    subprocess.run(["docker", "volume", "create", "--label", label, name], check=True)
    monkeypatch.setattr(stack, "PROJECT", project)
    monkeypatch.setattr(stack, "ENV_FILE", tmp_path / ".env")
    yield name
    subprocess.run(["docker", "volume", "rm", name], check=False, capture_output=True)


def test_up_without_env_but_with_old_volumes_refuses_in_one_line(
    orphan_volume: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = stack.cmd_up(argparse.Namespace(scale=[], timeout=1))
    out = capsys.readouterr().out
    assert status == 1
    assert out.count("\n") == 1, out
    assert orphan_volume in out
    assert f"docker volume rm {orphan_volume}" in out
    assert not stack.ENV_FILE.exists()  # no new passwords written over the old ones' absence


def test_a_secret_in_the_shell_does_not_override_the_stacks(
    compose_env: dict[str, str], service_token_secret: str
) -> None:
    # tests/conftest.py put a SERVICE_TOKEN_SECRET of this test's own into the environment.
    assert service_token_secret != compose_env["SERVICE_TOKEN_SECRET"]
    resolved = yaml.safe_load(stack.compose("config", capture=True).stdout)
    for service in stack.SERVICES:
        environment = resolved["services"][service]["environment"]
        assert environment["SERVICE_TOKEN_SECRET"] == compose_env["SERVICE_TOKEN_SECRET"], service
