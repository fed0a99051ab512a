"""The timeline consumer as a process of its own.

With ``TIMELINE_CONSUMER=off`` an order instance leaves the timeline to this process: every
event of the platform is then applied beside the saga engine, not on its event loop. Same
settings as the order service (its database and broker); it applies the order service's
migrations too (under their lock: whichever starts first), so it may start first.

    python -m order.timeline_worker       # runs until SIGTERM or SIGINT
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from ordermesh_shared.config import load_settings
from ordermesh_shared.database import Database, prepare_database
from ordermesh_shared.logging import configure_logging
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.messaging.consumer import ConsumerMetrics
from ordermesh_shared.messaging.wiring import start_consumer
from ordermesh_shared.saga import SAGA_MIGRATIONS
from ordermesh_shared.tasks import BackgroundTasks
from prometheus_client import CollectorRegistry

from order.app import MIGRATIONS, OrderSettings
from order.timeline import timeline_subscription

log = structlog.get_logger(__name__)


async def run(settings: OrderSettings, stop: asyncio.Event) -> None:
    """Consume into the timeline until ``stop`` is set."""
    db = Database(settings.database_url, max_size=settings.db_pool_max)
    async with db, Broker(settings.rabbitmq_url) as broker, BackgroundTasks() as tasks:
        await prepare_database(db, MIGRATIONS, extra=(SAGA_MIGRATIONS,))
        # Counted, not served: the queue's depth, which the order service exports, shows the
        # lag.
        metrics = ConsumerMetrics(CollectorRegistry())
        start_consumer(db, broker, tasks, metrics, timeline_subscription())
        log.info("timeline_worker.started")
        await stop.wait()
        log.info("timeline_worker.stopping")


async def _main(settings: OrderSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run(settings, stop)


def main() -> None:
    """Entry point: settings from the environment, as the order service reads them."""
    settings = load_settings(OrderSettings)
    configure_logging(
        service="order-timeline", instance_id=settings.instance_id, level=settings.log_level
    )
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
