"""Starting a consumer inside a service: one call from the service's setup hook.

>>> start_consumer(ctx, Subscription("order.timeline", ["#"], record_timeline_event))

The consumer runs as a supervised loop of the service (restarted if it dies, cancelled at
shutdown, shown in ``/health/ready``), waits for the broker and the migrations by itself,
and counts its outcomes in the service's ``/metrics``
(``messaging_events_consumed_total{queue, outcome}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ordermesh_shared.messaging.consumer import ConsumerMetrics, EventConsumer, Subscription
from ordermesh_shared.messaging.topology import Topology

if TYPE_CHECKING:
    from ordermesh_shared.bootstrap import ServiceContext

_METRICS_KEY = "messaging.consumer_metrics"


def consumer_metrics(ctx: ServiceContext) -> ConsumerMetrics:
    """The service's consumer counters, registered once however many consumers it runs."""
    metrics = ctx.extras.get(_METRICS_KEY)
    if not isinstance(metrics, ConsumerMetrics):
        metrics = ConsumerMetrics(ctx.metrics.registry)
        ctx.extras[_METRICS_KEY] = metrics
    return metrics


def start_consumer(
    ctx: ServiceContext, subscription: Subscription, *, topology: Topology | None = None
) -> EventConsumer:
    """Run a consumer of ``subscription`` for the life of the service."""
    consumer = EventConsumer(
        ctx.db, ctx.broker, subscription, topology=topology, metrics=consumer_metrics(ctx)
    )
    ctx.tasks.supervise(consumer.run, name=f"consumer:{subscription.queue}")
    return consumer
