"""Outbox metrics: what the relay did, and how far behind it is (lag, quarantine).

The lag gauges come from the database, not from the relay's memory, so every instance shows
them whether or not it leads; :class:`OutboxMonitor` refreshes them in the background (a
Prometheus scrape cannot await a query).

>>> metrics = OutboxMetrics(registry)               # the app's CollectorRegistry
>>> monitor = OutboxMonitor(db, metrics, interval=5.0)
>>> tasks.supervise(monitor.run, name="outbox-monitor")
>>> await monitor.lag()                             # OutboxLag(pending=3, ...), also for health
"""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ordermesh_shared.database import Database
from ordermesh_shared.outbox.store import OutboxLag, outbox_lag
from ordermesh_shared.transient import is_transient

log = structlog.get_logger(__name__)

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class OutboxMetrics:
    """The outbox's Prometheus series, registered on one app's registry.

    >>> metrics = OutboxMetrics(ctx.metrics.registry)
    >>> relay = OutboxRelay(db, broker, service="order", metrics=metrics)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "outbox_events_published_total",
            "Events the broker confirmed and the relay marked published.",
            registry=registry,
        )
        self.failures = Counter(
            "outbox_publish_failures_total",
            "Failed publish attempts: 'event' (returned, nacked, unencodable; counted towards"
            " quarantine) or 'broker' (unavailable; not counted).",
            ["kind"],
            registry=registry,
        )
        self.quarantined_total = Counter(
            "outbox_events_quarantined_total",
            "Rows the relay gave up on after too many failed attempts.",
            registry=registry,
        )
        self.fenced = Counter(
            "outbox_relay_fenced_total",
            "Batches whose marks were rejected because a newer relay leader holds the fence.",
            registry=registry,
        )
        self.fenced_out = Gauge(
            "outbox_relay_fenced_out",
            "1 while this instance leads the relay election but the fence refuses its term"
            " (etcd lost its data? /health/ready says what to do).",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "outbox_relay_batch_seconds",
            "Time to claim, publish and mark one batch.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.leader = Gauge(
            "outbox_relay_leader", "1 while this instance's relay is the leader.", registry=registry
        )
        self.pending = Gauge(
            "outbox_pending_events", "Committed events not yet published.", registry=registry
        )
        self.oldest_age = Gauge(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished event (0 when none).",
            registry=registry,
        )
        self.quarantined = Gauge(
            "outbox_quarantined_events",
            "Rows waiting in quarantine for an operator to re-drive them.",
            registry=registry,
        )

    def observe_lag(self, lag: OutboxLag) -> None:
        self.pending.set(lag.pending)
        self.oldest_age.set(lag.oldest_age_seconds)
        self.quarantined.set(lag.quarantined)


class OutboxMonitor:
    """Reads the outbox lag for ``/health/ready`` details and keeps the lag gauges fresh.

    >>> health.add_detail("outbox", monitor.lag_json)
    """

    def __init__(self, db: Database, metrics: OutboxMetrics, *, interval: float = 5.0) -> None:
        self._db = db
        self._metrics = metrics
        self._interval = interval

    async def lag(self) -> OutboxLag:
        """The lag now (raises while the database is unreachable or not migrated)."""
        async with self._db.pool.acquire() as conn:
            lag = await outbox_lag(conn)
        self._metrics.observe_lag(lag)
        return lag

    async def lag_json(self) -> dict[str, float | int]:
        """The lag as the readiness body shows it."""
        return (await self.lag()).as_json()

    async def run(self) -> None:
        """Refresh the gauges every ``interval`` seconds until cancelled."""
        while True:
            try:
                await self.lag()
            except Exception as exc:
                if not is_transient(exc):
                    raise  # the supervisor logs it and restarts the loop
                log.debug("outbox.lag_unavailable", error=str(exc))
            await asyncio.sleep(self._interval)
