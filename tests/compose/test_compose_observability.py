"""The observability profile on the offline stack, as someone runs it after `make up`:
`docker compose --profile observability up -d` starts Prometheus, which finds every service
instance by itself (a second payment replica included) and scrapes each of them.

Offline, Prometheus is Debian's build (no Consul discovery: it resolves the compose service
names instead, deploy/observability/prometheus-offline.yml); Jaeger and Grafana are left out.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from ordermesh_deploy import compose as stack

from tests.support.compose import compose, healthy, wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

PROFILE = ("--profile", "observability")


@pytest.fixture(scope="module")
def prometheus(order_api: str, compose_env: dict[str, str]) -> Iterator[str]:
    compose(*PROFILE, "up", "-d", "--no-build", "--no-recreate", "--scale", "payment=2")
    wait_for("2 healthy payment replicas", lambda: len(healthy("payment")) == 2, within=120)
    wait_for("Prometheus healthy", lambda: healthy("prometheus"), within=120)
    yield f"http://127.0.0.1:{compose_env['PROMETHEUS_PORT']}"
    # The stack's `down` runs without the profile: take Prometheus away first.
    compose(*PROFILE, "rm", "--stop", "--force", "prometheus", check=False)


def instance_addresses() -> dict[str, str]:
    """ip:8000 -> service, for every container of the four services."""
    addresses = {}
    for service in stack.SERVICES:
        ids = compose("ps", "-q", service).split()
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        out = subprocess.run(
            ["docker", "inspect", "-f", fmt, *ids], capture_output=True, text=True, check=True
        ).stdout
        addresses |= {f"{line.split()[0]}:8000": service for line in out.splitlines()}
    return addresses


def targets(prometheus: str) -> dict[str, dict[str, Any]]:
    """host:port -> the active target, as /api/v1/targets shows it."""
    body = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()
    return {t["labels"]["instance"]: t for t in body["data"]["activeTargets"]}


def test_prometheus_scrapes_every_instance_replicas_included(prometheus: str) -> None:
    expected = instance_addresses()
    assert list(expected.values()).count("payment") == 2

    def all_up() -> bool:
        seen = targets(prometheus)
        return set(seen) == set(expected) and all(t["health"] == "up" for t in seen.values())

    wait_for("every instance scraped", all_up, within=90, pause=2)
    jobs = {address: target["labels"]["job"] for address, target in targets(prometheus).items()}
    assert jobs == expected


def test_jaeger_and_grafana_are_left_out_offline(prometheus: str) -> None:
    assert compose("ps", "-q", "jaeger").split() == []
    assert compose("ps", "-q", "grafana").split() == []
