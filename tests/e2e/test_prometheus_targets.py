"""The local stack's scrape targets as someone with a Prometheus on this machine uses them:
``ordermesh-local up --scale payment=2`` lists every running instance in
``<run dir>/prometheus/targets.json``, and Prometheus started with
``deploy/observability/prometheus-local.yml`` scrapes each of them."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ordermesh_deploy.local import free_port
from ordermesh_deploy.prometheus_targets import TARGETS_FILE

from tests.support.stack import FAST_SETTINGS, RunningStack, start_stack, stop_stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = ROOT / "deploy" / "observability" / "prometheus-local.yml"
OFFSET = 25000


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory laid out like the checkout: the run dir is ``.run/`` beside ``deploy/``,
    so prometheus-local.yml's relative path finds this stack's target file."""
    base = tmp_path_factory.mktemp("checkout")
    (base / "deploy" / "observability").mkdir(parents=True)
    shutil.copy(LOCAL_CONFIG, base / "deploy" / "observability")
    return base


@pytest.fixture(scope="module")
def scaled_stack(layout: Path) -> Iterator[RunningStack]:
    running = start_stack(
        layout / ".run", offset=OFFSET, settings=FAST_SETTINGS, extra=("--scale", "payment=2")
    )
    yield running
    stop_stack(running)


def running_instances(stack: RunningStack) -> dict[str, str]:
    """program -> host:port of every service process supervisord runs now."""
    lines = stack.local("status").stdout.splitlines()
    running = [line.split()[0] for line in lines if " RUNNING " in line]
    return {p: stack.stack.instances[p].removeprefix("http://") for p in running if p != "etcd"}


def test_the_target_file_lists_every_running_instance_by_service(
    scaled_stack: RunningStack,
) -> None:
    groups = json.loads((scaled_stack.run_dir / TARGETS_FILE).read_text())
    listed = {(g["labels"]["service"], target) for g in groups for target in g["targets"]}
    running = running_instances(scaled_stack)
    assert len(running) == 5  # order, inventory, shipping and two payments
    assert listed == {(program.rpartition("-")[0], addr) for program, addr in running.items()}


@pytest.fixture
def prometheus(layout: Path, scaled_stack: RunningStack) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary: Debian's prometheus package has it (make deps)")
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={layout / 'deploy' / 'observability' / 'prometheus-local.yml'}",
            f"--storage.tsdb.path={layout / 'prometheus-data'}",
            f"--web.listen-address={address}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield f"http://{address}"
    process.terminate()
    process.wait(timeout=30)


def scraped(prometheus: str) -> dict[str, Any]:
    """host:port -> the target's health and labels, as /api/v1/targets shows them."""
    try:
        body = httpx.get(f"{prometheus}/api/v1/targets", timeout=2).json()
    except httpx.HTTPError:
        return {}
    return {t["scrapeUrl"].split("/")[2]: t for t in body["data"]["activeTargets"]}


def test_a_local_prometheus_scrapes_every_instance(
    scaled_stack: RunningStack, prometheus: str
) -> None:
    running = running_instances(scaled_stack)
    deadline = time.monotonic() + 60  # first scrapes within one 5 s interval of discovery
    while time.monotonic() < deadline:
        targets = scraped(prometheus)
        if set(targets) == set(running.values()) and all(
            t["health"] == "up" for t in targets.values()
        ):
            break
        time.sleep(1)
    assert {addr: t["health"] for addr, t in targets.items()} == dict.fromkeys(
        running.values(), "up"
    )
    jobs = {addr: t["labels"]["job"] for addr, t in targets.items()}
    assert jobs == {addr: program.rpartition("-")[0] for program, addr in running.items()}
