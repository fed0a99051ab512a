"""The retry budget: retries held to a fraction of recent requests over a sliding window."""

from __future__ import annotations

import httpx
import pytest
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.resilience import (
    ClientPolicy,
    HttpxEngine,
    RetryBudgetExhausted,
    ServiceClient,
    StaticInstances,
    UpstreamUnavailable,
)
from ordermesh_shared.resilience.budget import RetryBudget
from prometheus_client import CollectorRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spend(budget: RetryBudget) -> int:
    """Retries granted until the budget refuses."""
    granted = 0
    while budget.can_retry():
        budget.record_retry()
        granted += 1
    return granted


def test_a_lone_request_can_still_retry() -> None:
    budget = RetryBudget(ratio=0.2, window=10, min_retries=1, clock=Clock())
    budget.record_request()
    assert spend(budget) == 1


def test_retries_are_capped_at_the_ratio_of_requests_plus_the_minimum() -> None:
    budget = RetryBudget(ratio=0.2, window=10, min_retries=3, clock=Clock())
    for _ in range(100):
        budget.record_request()
    assert spend(budget) == 3 + 20


def test_old_requests_and_retries_slide_out_of_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.5, window=10, min_retries=0, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert spend(budget) == 5
    clock.now += 5
    for _ in range(10):
        budget.record_request()
    assert spend(budget) == 5  # 20 requests in the window allow 10; 5 were already spent
    clock.now += 5.5
    assert spend(budget) == 0  # the first 10 requests left, and so did their 5 retries...
    clock.now += 5
    assert spend(budget) == 0  # ...and now everything has left the window
    budget.record_request()
    budget.record_request()
    assert spend(budget) == 1


def test_a_long_silence_clears_everything() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, window=10, min_retries=2, clock=clock)
    for _ in range(50):
        budget.record_request()
    spend(budget)
    clock.now += 3600
    assert spend(budget) == 2


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio=2)


async def test_the_budget_stops_retries_during_a_full_outage() -> None:
    requests = 0

    def down(_request: httpx.Request) -> httpx.Response:
        nonlocal requests
        requests += 1
        return httpx.Response(503)

    metrics = CollectorRegistry()
    policy = ClientPolicy(
        max_attempts=5,
        backoff=0.0005,
        backoff_cap=0.001,
        breaker_failures=10_000,
        budget_ratio=0.2,
        budget_min_retries=3,
    )
    source = StaticInstances({"pay": [ServiceInstance("pay", "pay-1", "10.0.0.1", 9000)]})
    engine = HttpxEngine(transport=httpx.MockTransport(down))
    errors: list[UpstreamUnavailable] = []
    async with ServiceClient(source, metrics=metrics, policy=policy, engine=engine) as clients:
        for _ in range(100):
            with pytest.raises(UpstreamUnavailable) as caught:
                await clients.pay.get("/thing")
            errors.append(caught.value)
    # Without a budget: 500 requests. With it: 100 first attempts and at most 3 + 20% retries.
    assert 100 < requests <= 100 + 3 + 20
    assert sum(isinstance(e, RetryBudgetExhausted) for e in errors) >= 70
    assert all(e.status == 503 for e in errors)
    refused = metrics.get_sample_value("client_retry_budget_exhausted_total", {"target": "pay"})
    assert refused is not None
    assert refused >= 70
