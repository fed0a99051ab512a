"""Which instances a chaos command acts on: one replica of a scaled service, never all unless
asked; local program names keep working. Pure functions and a fake target: no processes."""

from __future__ import annotations

import random

import pytest
from ordermesh_deploy.chaos import act, build_parser
from ordermesh_deploy.targets import choose_instances, split_name

COMPOSE = ["consul-1", "etcd-1", "order-1", "payment-1", "payment-2", "payment-3", "postgres-1"]
LOCAL = ["order-1", "payment-1", "payment-2", "inventory-1", "etcd"]


def pick(name: str, available: list[str], *, everyone: bool = False, seed: int = 1) -> list[str]:
    return choose_instances(name, available, everyone=everyone, rng=random.Random(seed))


def test_a_bare_service_name_means_one_of_its_replicas() -> None:
    assert len(pick("payment", COMPOSE)) == 1
    assert pick("payment", COMPOSE)[0] in ("payment-1", "payment-2", "payment-3")


def test_the_pick_is_repeatable_with_its_seed_and_varies_across_seeds() -> None:
    assert pick("payment", COMPOSE, seed=7) == pick("payment", COMPOSE, seed=7)
    picked = {pick("payment", COMPOSE, seed=seed)[0] for seed in range(40)}
    assert picked == {"payment-1", "payment-2", "payment-3"}


def test_every_replica_only_when_asked() -> None:
    assert pick("payment", COMPOSE, everyone=True) == ["payment-1", "payment-2", "payment-3"]


def test_a_named_replica_is_that_replica_even_with_all() -> None:
    assert pick("payment-2", COMPOSE) == ["payment-2"]
    assert pick("payment-2", COMPOSE, everyone=True) == ["payment-2"]


def test_local_program_names_keep_working() -> None:
    assert pick("payment-1", LOCAL) == ["payment-1"]
    assert pick("etcd", LOCAL) == ["etcd"]
    assert pick("inventory", LOCAL) == ["inventory-1"]


def test_an_infrastructure_service_is_its_one_container_on_compose() -> None:
    assert pick("postgres", COMPOSE) == ["postgres-1"]


def test_a_missing_replica_names_the_ones_there_are() -> None:
    with pytest.raises(LookupError, match="payment-7: no such instance; payment has payment-1"):
        pick("payment-7", COMPOSE)


def test_an_unknown_name_lists_the_services() -> None:
    with pytest.raises(LookupError, match=r"paymnt: no such service.*try consul, etcd, order"):
        pick("paymnt", COMPOSE)


def test_replicas_sort_by_number_not_text() -> None:
    names = [f"payment-{n}" for n in (10, 2, 1)]
    assert pick("payment", names, everyone=True) == ["payment-1", "payment-2", "payment-10"]
    assert split_name("relay-leader:payment") == ("relay-leader:payment", None)


class FakeTarget:
    """Records what was done; names as a scaled compose stack has them."""

    def __init__(self) -> None:
        self.done: list[str] = []

    def names(self) -> list[str]:
        return COMPOSE

    async def resolve(self, name: str, *, everyone: bool, rng: random.Random) -> list[str]:
        return choose_instances(name, COMPOSE, everyone=everyone, rng=rng)

    async def kill(self, name: str) -> None:
        self.done.append(f"kill {name}")

    async def pause(self, name: str) -> None:
        self.done.append(f"pause {name}")

    async def resume(self, name: str) -> None:
        self.done.append(f"resume {name}")

    async def restart(self, name: str) -> None:
        self.done.append(f"restart {name}")

    async def partition(self, name: str, *, hold: float) -> None:
        self.done.append(f"partition {name} {hold:g}")


async def test_killing_a_scaled_service_kills_one_replica_and_says_which(
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = FakeTarget()
    chosen = await act(target, "kill", "payment", seed=3)
    assert target.done == [f"kill {chosen[0]}"]
    assert f"payment is {chosen[0]} (picked with --seed 3)" in capsys.readouterr().out


async def test_all_acts_on_every_replica() -> None:
    target = FakeTarget()
    await act(target, "pause", "payment", everyone=True, hold=0.01)
    assert sorted(target.done) == sorted(
        [f"{a} payment-{n}" for a in ("pause", "resume") for n in (1, 2, 3)]
    )


def test_a_partition_stays_until_healed_and_b_defaults_to_everyone() -> None:
    parser = build_parser()
    args = parser.parse_args(["partition", "etcd"])
    assert (args.a, args.b, args.hold) == ("etcd", "all", None)
    assert parser.parse_args(["partition", "order", "inventory", "--for", "10"]).hold == 10.0


def test_pause_defaults_to_staying_paused() -> None:
    parser = build_parser()
    assert parser.parse_args(["pause", "inventory"]).hold == 0.0
    assert parser.parse_args(["kill", "payment"]).hold == 0.0
    assert parser.parse_args(["fault", "payment-2", "--clear"]).token is None
