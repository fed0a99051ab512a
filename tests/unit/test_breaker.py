"""Per-instance circuit breakers: tripping, failing fast, a single half-open trial, recovery."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.resilience import (
    CircuitOpen,
    ClientPolicy,
    HttpxEngine,
    ServiceClient,
    StaticInstances,
    UpstreamRejected,
    UpstreamUnavailable,
)
from ordermesh_shared.resilience.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerRejected,
    InstanceBreaker,
)
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

RESET = 0.05


class Sick(Exception):
    pass


def make_breaker(changes: list[tuple[str, str]] | None = None) -> InstanceBreaker:
    def record(_b: InstanceBreaker, old: str, new: str) -> None:
        if changes is not None:
            changes.append((old, new))

    return InstanceBreaker("pay-1", failures=3, reset_timeout=RESET, on_change=record)


def fail(breaker: InstanceBreaker) -> None:
    with pytest.raises(Sick), breaker.guard():
        raise Sick


def succeed(breaker: InstanceBreaker) -> None:
    with breaker.guard():
        pass


def trip(breaker: InstanceBreaker) -> None:
    for _ in range(3):
        fail(breaker)
    assert breaker.state == OPEN


def test_opens_after_n_consecutive_failures() -> None:
    breaker = make_breaker()
    fail(breaker)
    fail(breaker)
    succeed(breaker)  # a success in between resets the count
    fail(breaker)
    fail(breaker)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


def test_a_success_of_a_call_started_before_the_failures_resets_the_count() -> None:
    # Calls overlap: one started while all was well succeeds after others failed.
    breaker = make_breaker()
    slow = breaker.guard()
    slow.__enter__()
    fail(breaker)
    fail(breaker)
    slow.__exit__(None, None, None)  # its success forgets the two failures
    fail(breaker)
    fail(breaker)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


def test_open_rejects_at_once_without_running_the_call() -> None:
    breaker = make_breaker()
    trip(breaker)
    ran = False
    with pytest.raises(BreakerRejected), breaker.guard():
        ran = True
    assert not ran
    assert not breaker.admits()


async def test_after_the_reset_timeout_exactly_one_trial_passes() -> None:
    breaker = make_breaker()
    trip(breaker)
    await asyncio.sleep(RESET * 1.5)
    assert breaker.admits()
    release = asyncio.Event()
    admitted = 0

    async def call() -> None:
        nonlocal admitted
        with breaker.guard():
            admitted += 1
            await release.wait()

    trial = asyncio.create_task(call())
    await asyncio.sleep(0)  # the trial is in flight
    assert breaker.state == HALF_OPEN
    others = [asyncio.create_task(call()) for _ in range(10)]
    results = await asyncio.gather(*others, return_exceptions=True)
    assert all(isinstance(r, BreakerRejected) for r in results)
    release.set()
    await trial
    assert admitted == 1
    assert breaker.state == CLOSED


async def test_a_failed_trial_opens_it_again_for_another_timeout() -> None:
    changes: list[tuple[str, str]] = []
    breaker = make_breaker(changes)
    trip(breaker)
    await asyncio.sleep(RESET * 1.5)
    fail(breaker)
    assert breaker.state == OPEN
    assert not breaker.admits()
    await asyncio.sleep(RESET * 1.5)
    succeed(breaker)
    assert changes == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


async def test_a_cancelled_trial_counts_as_a_failure() -> None:
    breaker = make_breaker()
    trip(breaker)
    await asyncio.sleep(RESET * 1.5)

    async def hang() -> None:
        with breaker.guard():
            await asyncio.Event().wait()

    trial = asyncio.create_task(hang())
    await asyncio.sleep(0)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert breaker.state == OPEN


# -- through the client ---------------------------------------------------------------------


def client(handler: httpx.MockTransport, metrics: CollectorRegistry, count: int) -> ServiceClient:
    found = [ServiceInstance("pay", f"pay-{n}", "10.0.0.1", 9000 + n) for n in range(count)]
    policy = ClientPolicy(max_attempts=1, breaker_failures=3, breaker_reset=60)
    engine = HttpxEngine(transport=handler)
    return ServiceClient(
        StaticInstances({"pay": found}), metrics=metrics, policy=policy, engine=engine
    )


async def test_4xx_never_counts_as_a_failure() -> None:
    transport = httpx.MockTransport(lambda _r: httpx.Response(409, json={"detail": "no"}))
    async with client(transport, CollectorRegistry(), 1) as clients:
        for _ in range(20):
            with pytest.raises(UpstreamRejected):
                await clients.pay.post("/payments", json={})
        assert clients.pay.breaker_states() == {"pay-0": CLOSED}


async def test_an_open_instance_is_skipped_while_another_admits_calls() -> None:
    hits: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        port = request.url.port or 0
        hits.append(port)
        return httpx.Response(503 if port == 9000 else 200)

    metrics = CollectorRegistry()
    async with client(httpx.MockTransport(handler), metrics, 2) as clients:
        with capture_logs() as logs:
            for _ in range(40):
                with contextlib.suppress(UpstreamUnavailable):
                    await clients.pay.get("/thing")
        assert clients.pay.breaker_states() == {"pay-0": OPEN, "pay-1": CLOSED}
    assert hits.count(9000) == 3  # it tripped on its third failure and was never tried again
    assert hits[-30:] == [9001] * 30
    state = metrics.get_sample_value("client_breaker_state", {"target": "pay", "instance": "pay-0"})
    assert state == 2
    opened = [e for e in logs if e["event"] == "client.breaker"]
    assert opened == [
        {
            "event": "client.breaker",
            "log_level": "warning",
            "target": "pay",
            "instance": "pay-0",
            "old": CLOSED,
            "new": OPEN,
        }
    ]


async def test_when_every_breaker_is_open_calls_fail_fast() -> None:
    hits = 0

    def handler(_request: httpx.Request) -> httpx.Response:
        nonlocal hits
        hits += 1
        return httpx.Response(503)

    async with client(httpx.MockTransport(handler), CollectorRegistry(), 1) as clients:
        for _ in range(3):
            with pytest.raises(UpstreamUnavailable):
                await clients.pay.get("/thing")
        for _ in range(10):
            with pytest.raises(CircuitOpen):
                await clients.pay.get("/thing")
    assert hits == 3
