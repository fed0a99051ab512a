"""demo-cap's DNS phase, without a stack: when each view dropped the dead instance, the
verdict, and the rows it prints."""

from __future__ import annotations

import asyncio

import pytest
from ordermesh_deploy import stacks
from ordermesh_deploy.demo_cap import dns_phase
from ordermesh_deploy.demo_dns import Outcome, Sample, render
from ordermesh_deploy.stacks import ComposeEndpoints, Container

DEAD, LIVE = "payment-1", "payment-2"


def samples(*rows: tuple[float, tuple[str, ...], tuple[str, ...]]) -> list[Sample]:
    return [Sample(at, watched, resolved) for at, watched, resolved in rows]


def test_each_view_is_timed_from_when_it_dropped_the_instance_for_good() -> None:
    seen = samples(
        (0.0, (DEAD, LIVE), (DEAD, LIVE)),
        (0.5, (LIVE,), (DEAD, LIVE)),
        (1.0, (DEAD, LIVE), (DEAD, LIVE)),  # a blip: the watch held it again
        (1.5, (LIVE,), (DEAD, LIVE)),
        (5.0, (LIVE,), (LIVE,)),
    )
    outcome = Outcome.of(seen, DEAD)
    assert (outcome.watch_dropped, outcome.dns_dropped) == (1.5, 5.0)
    assert outcome.ok
    assert "DNS after 5.0 s (stale 3.5 s longer" in outcome.summary()


def test_a_view_that_never_dropped_it_fails_the_phase() -> None:
    seen = samples((0.0, (DEAD,), (DEAD,)), (20.0, (), (DEAD,)))
    outcome = Outcome.of(seen, DEAD)
    assert outcome.dns_dropped is None
    assert not outcome.ok
    assert "not dropped by both views" in outcome.summary()


def test_dns_dropping_it_before_the_watch_is_not_what_the_demo_claims() -> None:
    seen = samples((0.0, (DEAD,), (DEAD,)), (1.0, (DEAD,), ()), (2.0, (), ()))
    assert not Outcome.of(seen, DEAD).ok


def test_rows_point_at_staleness_both_ways() -> None:
    assert render(Sample(1.5, (LIVE,), (DEAD, LIVE)), DEAD).endswith(
        "<- DNS stale: callers would still pick it"
    )
    assert render(Sample(9.0, (DEAD, LIVE), (LIVE,)), DEAD).endswith(
        "<- DNS stale: callers do not know it yet"
    )
    row = render(Sample(6.0, (), ()), DEAD)
    assert row.split() == ["6.0", "-", "-"]


def test_no_running_instance_is_one_failed_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stopped = Container(id="c1", project="p", service="payment", number=1, state="exited")
    # The phase looks at the containers again first (no docker here).
    monkeypatch.setattr(stacks, "project_containers", lambda project: [stopped])
    outcome = asyncio.run(dns_phase(ComposeEndpoints([stopped])))
    assert [(e.ok, e.text) for e in outcome] == [
        (False, "DNS phase: no payment container is running: make status")
    ]
