"""A CI-sized subset of the chaos scenarios (fixed seed), each judged by the auditor."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from ordermesh_deploy.chaos import SCENARIOS, Scenario, random_faults, run_scenario
from ordermesh_deploy.stacks import LocalEndpoints
from ordermesh_deploy.targets import LocalTarget

from tests.support.stack import FAST_SETTINGS, RunningStack, start_stack, stop_stack

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def scenario_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    # Two inventory instances, so killing the relay leader shows another taking over.
    running = start_stack(
        tmp_path_factory.mktemp("chaos") / "run",
        offset=24000,
        settings=FAST_SETTINGS,
        extra=("--scale", "inventory=2"),
    )
    yield running
    stop_stack(running)


# Partitions need root (iptables, cgroups), as CI has. Two of the four partition scenarios
# run here (~20 s each on a quiet machine); `make chaos-all` runs every one.
PARTITIONS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(os.geteuid() != 0, reason="partitions change packet filters"),
    )
    for name in ("partition-order-inventory", "partition-etcd")
]


@pytest.mark.parametrize(
    "name", ["pause-inventory", "kill-etcd", "kill-relay-leader", "random", *PARTITIONS]
)
async def test_scenario_keeps_every_invariant(
    scenario_stack: RunningStack, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario: Scenario = SCENARIOS[name]
    if name == "random":
        # CI-sized: the same seeded faults, every 3 s for 20 s instead of two minutes.
        scenario = Scenario(
            "random",
            scenario.what,
            lambda t: random_faults(t, every=3.0, duration=20.0, seed=20261126),
            duration=20.0,
        )
    stack = scenario_stack.stack
    ok = await run_scenario(LocalTarget(stack), LocalEndpoints(stack), scenario, seed=20261126)
    assert ok, capsys.readouterr().out
