"""The bookkeeping of partitions: which cut a command means, what is recorded, what heal
removes. A hand-written cutter records what it was asked; no packet filter is touched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from ordermesh_deploy.partition import (
    Cut,
    PartitionError,
    create,
    heal,
    keep,
    load,
)
from ordermesh_deploy.partition_local import _address, _tuple_rules


class FakeCutter:
    kind = "local"
    chain_prefix = "OMCUT-test"

    def __init__(self, state_dir: Path, *, fail: bool = False) -> None:
        self.state_file = state_dir / "partitions.json"
        self.fail = fail
        self.applied: list[str] = []
        self.removed: list[tuple[str, list[str]]] = []

    def components(self) -> list[str]:
        return ["order", "inventory", "payment", "postgres", "etcd"]

    def apply(self, cut: Cut) -> None:
        self.applied.append(cut.chain)
        if self.fail:
            raise PartitionError("no way")

    def remove(self, cut: Cut, *, remaining: list[Cut]) -> None:
        self.removed.append((cut.chain, [c.chain for c in remaining]))


def test_a_cut_is_recorded_and_the_same_pair_again_refreshes_it(tmp_path: Path) -> None:
    cutter = FakeCutter(tmp_path)
    first = create(cutter, "order", "inventory", hold=None)
    again = create(cutter, "inventory", "order", hold=None)
    assert first.chain == again.chain == "OMCUT-test-1"
    assert cutter.applied == ["OMCUT-test-1", "OMCUT-test-1"]
    assert [(c.a, c.b, c.until) for c in load(cutter.state_file)] == [("order", "inventory", None)]


def test_a_cut_that_fails_leaves_no_record_and_nothing_behind(tmp_path: Path) -> None:
    cutter = FakeCutter(tmp_path, fail=True)
    with pytest.raises(PartitionError, match="no way"):
        create(cutter, "order", "postgres", hold=5)
    assert load(cutter.state_file) == []
    assert cutter.removed == [("OMCUT-test-1", [])]


def test_unknown_names_and_a_component_cut_from_itself_are_refused(tmp_path: Path) -> None:
    cutter = FakeCutter(tmp_path)
    with pytest.raises(PartitionError, match=r"^ordr: not a component of the local stack; try"):
        create(cutter, "ordr", "inventory", hold=None)
    with pytest.raises(PartitionError, match="cannot be cut from itself"):
        create(cutter, "order", "order", hold=None)
    with pytest.raises(PartitionError, match="all: not a component"):
        create(cutter, "all", "order", hold=None)
    assert create(cutter, "etcd", "all", hold=None).b == "all"


def test_heal_takes_the_cuts_named_and_tells_the_backend_what_stays(tmp_path: Path) -> None:
    cutter = FakeCutter(tmp_path)
    create(cutter, "order", "inventory", hold=None)
    create(cutter, "payment", "postgres", hold=None)
    create(cutter, "etcd", "all", hold=None)
    assert [c.chain for c in heal(cutter, "postgres")] == ["OMCUT-test-2"]
    assert cutter.removed == [("OMCUT-test-2", ["OMCUT-test-1", "OMCUT-test-3"])]
    assert [(c.a, c.b) for c in heal(cutter)] == [("order", "inventory"), ("etcd", "all")]
    assert load(cutter.state_file) == []


async def test_a_held_cut_heals_itself_even_when_its_holder_is_cancelled(tmp_path: Path) -> None:
    cutter = FakeCutter(tmp_path)
    cut = create(cutter, "order", "inventory", hold=30)
    holder = asyncio.create_task(keep(cutter, cut))
    await asyncio.sleep(0.1)
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert load(cutter.state_file) == []
    assert [chain for chain, _ in cutter.removed] == ["OMCUT-test-1"]


async def test_a_held_cut_heals_when_its_time_is_up(tmp_path: Path) -> None:
    cutter = FakeCutter(tmp_path)
    started = time.monotonic()
    await keep(cutter, create(cutter, "order", "inventory", hold=0.3))
    assert 0.25 < time.monotonic() - started < 2
    assert load(cutter.state_file) == []


def test_proc_net_tcp_addresses_and_the_rules_of_an_open_connection() -> None:
    assert _address("0100007F:1538") == ("127.0.0.1", 5432)
    out, back = _tuple_rules(("127.0.0.1", 40000, "127.0.0.1", 5432))
    assert " ".join(out) == "-p tcp -s 127.0.0.1 --sport 40000 -d 127.0.0.1 --dport 5432 -j DROP"
    assert " ".join(back) == "-p tcp -s 127.0.0.1 --sport 5432 -d 127.0.0.1 --dport 40000 -j DROP"
