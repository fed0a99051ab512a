"""Starting a consumer inside a service: one call from the service's setup hook, given what
the consumer needs (not the whole service context).

>>> metrics = ConsumerMetrics(ctx.metrics.registry)        # once per service
>>> start_consumer(ctx.db, ctx.broker, ctx.tasks, metrics,
...                Subscription("order.timeline", ["#"], record_timeline_event))

The consumer runs as a supervised loop of the service (restarted if it dies, cancelled at
shutdown, shown in ``/health/ready``), waits for the broker and the migrations by itself,
and counts its outcomes in the service's ``/metrics``
(``messaging_events_consumed_total{queue, outcome}``).
"""

from __future__ import annotations

from ordermesh_shared.database import Database
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.messaging.consumer import ConsumerMetrics, EventConsumer, Subscription
from ordermesh_shared.messaging.topology import Topology
from ordermesh_shared.tasks import BackgroundTasks


def start_consumer(
    db: Database,
    broker: Broker,
    tasks: BackgroundTasks,
    metrics: ConsumerMetrics,
    subscription: Subscription,
    *,
    topology: Topology | None = None,
) -> EventConsumer:
    """Run a consumer of ``subscription`` for the life of ``tasks`` (the service's), counted
    in ``metrics`` (one per service, however many consumers it runs)."""
    consumer = EventConsumer(db, broker, subscription, topology=topology, metrics=metrics)
    tasks.supervise(consumer.run, name=f"consumer:{subscription.queue}")
    return consumer
