"""The saga engine's Prometheus series: how sagas end, how long steps take, what is retried.

Labels are bounded by the saga definitions (saga and step names, directions, a fixed set of
statuses and outcomes); a participant's free-text reason never becomes a label (it is in the
step log and the order's ``failure_reason``). The one label a participant names is a parked
saga's ``reason``: the refusal's reason code (``insufficient_funds``), kept only while it is
a short lowercase word and while fewer than :data:`MAX_PARK_REASONS` have been seen;
anything else counts as ``other``.

>>> metrics = SagaMetrics(ctx.metrics.registry)        # the app's CollectorRegistry
>>> engine = SagaEngine(db, owner=..., definitions=[...], metrics=metrics)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Steps are remote calls retried with backoff: from milliseconds to minutes.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Distinct parking reasons one process labels (then "other"): a participant bug sending a
# new code per refusal must not make a series per refusal.
MAX_PARK_REASONS = 20
_REASON_CODE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class SagaMetrics:
    """Sagas started and finished, step durations and failed attempts, sagas in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "sagas_started_total", "Sagas created, by saga.", ["saga"], registry=registry
        )
        self.finished = Counter(
            "sagas_finished_total",
            "Sagas ended, by saga, status (completed, cancelled, compensation_failed) and the"
            " step that decided it (the refused or failed step; '' when completed).",
            ["saga", "status", "step"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "saga_step_duration_seconds",
            "Time from a step's first attempt to its end (retries included), by saga, step,"
            " direction (forward, compensate) and outcome (succeeded, rejected, failed).",
            ["saga", "step", "direction", "outcome"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.failed_attempts = Counter(
            "saga_step_failed_attempts_total",
            "Attempts of a step that failed (a fault or a refusal), by saga, step and direction.",
            ["saga", "step", "direction"],
            registry=registry,
        )
        self.stuck = Gauge(
            "saga_steps_stuck_after_pivot",
            "Steps after the pivot that have failed at least the alert threshold of attempts in"
            " a row and are still being retried (alert when above 0).",
            ["saga", "step"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "sagas_in_flight",
            "Sagas running in this process now (forward or compensating).",
            registry=registry,
        )
        self.retries = Counter(
            "saga_step_retries_total",
            "Attempts of a step made again after a failed one, by saga, step and direction.",
            ["saga", "step", "direction"],
            registry=registry,
        )
        self.parked = Counter(
            "sagas_parked_total",
            "Sagas parked (compensation_failed) for an operator, by saga, the step whose undo"
            " kept being refused, and the refusal's reason code.",
            ["saga", "step", "reason"],
            registry=registry,
        )
        self.recovered = Counter(
            "sagas_recovered_total",
            "Sagas this process took over from an owner whose lease lapsed (it crashed or"
            " hung) or from its own earlier run.",
            registry=registry,
        )
        self._reasons: set[str] = set()

    def count_parked(self, saga: str, step: str, reason: str) -> None:
        """A saga parked because ``step``'s undo was refused with ``reason`` (a code)."""
        self.parked.labels(saga, step, self._bounded(reason)).inc()

    def _bounded(self, reason: str) -> str:
        if reason in self._reasons:
            return reason
        if not _REASON_CODE.match(reason) or len(self._reasons) >= MAX_PARK_REASONS:
            return "other"
        self._reasons.add(reason)
        return reason

    def count_in_flight(self, read: Callable[[], int]) -> None:
        """Read the in-flight count at scrape time from ``read`` (the engine's)."""
        self.in_flight.set_function(read)
