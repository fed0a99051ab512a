"""The client's Prometheus metrics, registered on the registry it is given (never the global).

Per target service: calls by outcome, retries, retry-budget refusals, call latency; per
instance: breaker state (0 closed, 1 half-open, 2 open). Label children are bound once per
target so the hot path is a dictionary-free ``inc()`` and ``observe()``.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ordermesh_shared.resilience.breaker import CLOSED, HALF_OPEN, OPEN

OUTCOMES = ("ok", "rejected", "unavailable", "circuit_open", "budget_exhausted", "deadline")
BREAKER_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ClientMetrics:
    """The metric families; :meth:`for_target` binds the children of one target service.

    >>> metrics = ClientMetrics(CollectorRegistry())
    >>> payment = metrics.for_target("payment")
    >>> payment.outcomes["ok"].inc(); payment.latency.observe(0.004)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "client_requests_total",
            "Calls made through ServiceClient, by target service and outcome.",
            ["target", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "client_retries_total",
            "Retries made (attempts after the first), by target service.",
            ["target"],
            registry=registry,
        )
        self.budget_exhausted = Counter(
            "client_retry_budget_exhausted_total",
            "Retries not made because the target's retry budget was spent.",
            ["target"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "client_breaker_state",
            "Circuit breaker state per instance: 0 closed, 1 half-open, 2 open.",
            ["target", "instance"],
            registry=registry,
        )
        self.latency = Histogram(
            "client_request_duration_seconds",
            "Time of a whole call (all attempts and waits), by target service.",
            ["target"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )

    def for_target(self, target: str) -> TargetMetrics:
        return TargetMetrics(self, target)


class TargetMetrics:
    """The children of one target service, bound once."""

    def __init__(self, families: ClientMetrics, target: str) -> None:
        self._families = families
        self.target = target
        self.outcomes = {o: families.calls.labels(target, o) for o in OUTCOMES}
        self.retries = families.retries.labels(target)
        self.budget_exhausted = families.budget_exhausted.labels(target)
        self.latency = families.latency.labels(target)

    def breaker(self, instance_id: str, state: str) -> None:
        """Export an instance's breaker state."""
        self._families.breaker_state.labels(self.target, instance_id).set(BREAKER_VALUES[state])

    def forget(self, instance_id: str) -> None:
        """Drop a departed instance's series (instances come and go; series must not pile up)."""
        with contextlib.suppress(KeyError):  # never exported, or already dropped
            self._families.breaker_state.remove(self.target, instance_id)
