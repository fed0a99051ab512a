"""The catalogue replica: inventory's products (name, price, units available) kept in order's
database, eventually consistent, so that ``POST /orders`` quotes and validates without asking
inventory, and ``GET /catalogue`` answers while inventory is away.

How it stays right (per SKU, inventory's ``version`` grows with every change):

* inventory writes a ``product_changed`` event (the product's facts and new version) in the
  statement that changes them; the consumer applies each once (inbox) and only over an older
  version, so a redelivered or late event changes nothing;
* a replica starts by subscribing, *then* reading ``GET /catalogue/snapshot`` from inventory
  (retried in the background while inventory is unreachable; order serves meanwhile): a
  change committed before the read is in the snapshot, a later one is in the queue, and the
  version makes whichever of the two arrives second a no-op where it is older;
* each instance keeps an in-memory copy of the table (:class:`CatalogueView`), refreshed
  every ``CATALOGUE_REFRESH`` seconds, which is what ``POST /orders`` quotes from (no
  database round trip on the request path).

>>> view = start_catalogue(ctx, refresh=0.5)       # in the order service's setup hook
>>> view.quote([Line("KB-101", 1)]).price_of("KB-101")
Decimal('89.00')
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import structlog
from ordermesh_shared.bootstrap import ServiceContext
from ordermesh_shared.database import Database, DbConn
from ordermesh_shared.messaging.consumer import ConsumerMetrics, EventConsumer, Subscription
from ordermesh_shared.messaging.envelope import Event
from ordermesh_shared.messaging.topology import Topology
from ordermesh_shared.resilience import UpstreamError
from ordermesh_shared.resilience.client import TargetService
from ordermesh_shared.transient import is_transient
from pydantic import ValidationError

from order import catalogue_store
from order.domain import Line, ProductFact, Quote, quote

log = structlog.get_logger(__name__)

CATALOGUE_QUEUE = "order.catalogue"
PRODUCT_CHANGED = "product_changed"
SNAPSHOT_PATH = "/catalogue/snapshot"
SNAPSHOT_RETRY_MAX = 5.0  # seconds between snapshot attempts, at most


def fact_of(data: dict[str, Any], changed_at: datetime | None = None) -> ProductFact:
    """A product's facts as inventory's event payload or snapshot entry carries them."""
    return ProductFact(
        sku=str(data["sku"]),
        name=str(data["name"]),
        price=Decimal(str(data["price"])),
        available=int(data["available"]),
        version=int(data["version"]),
        changed_at=changed_at,
    )


def newest_per_sku(facts: Iterable[ProductFact]) -> list[ProductFact]:
    """The highest version of each SKU's facts (one statement writes a row once)."""
    newest: dict[str, ProductFact] = {}
    for fact in facts:
        kept = newest.get(fact.sku)
        if kept is None or kept.version < fact.version:
            newest[fact.sku] = fact
    return [newest[sku] for sku in sorted(newest)]


# -- the consumer ------------------------------------------------------------------------------


async def apply_product_events(conn: DbConn, events: Sequence[Event]) -> None:
    """The consumer's batch handler, in the inbox's transaction."""
    facts = [fact_of(e.data, e.time) for e in events if e.event_type == PRODUCT_CHANGED]
    if facts:
        await catalogue_store.apply_events(conn, newest_per_sku(facts))


async def apply_product_event(conn: DbConn, event: Event) -> None:
    """The consumer's handler for a message retried on its own."""
    await apply_product_events(conn, [event])


def catalogue_subscription() -> Subscription:
    """Inventory's product_changed events."""
    binding = Topology.routing_key("inventory", PRODUCT_CHANGED)
    # Two lanes: the writes are small, and a busy lane's batches grow (one commit for many).
    return Subscription(
        CATALOGUE_QUEUE,
        [binding],
        apply_product_event,
        batch_handler=apply_product_events,
        concurrency=2,
    )


# -- the cold start: inventory's snapshot ---------------------------------------------------


class SnapshotFill:
    """Reads inventory's snapshot once the replica's queue is bound, and applies it.

    Runs once per start (a warm replica is refreshed too: it also repairs anything lost to a
    dead-lettered event). While inventory is unreachable it keeps trying, never failing:
    order serves meanwhile, from what the replica has (if anything).
    """

    def __init__(self, db: Database, inventory: TargetService, subscribed: asyncio.Event) -> None:
        self._db = db
        self._inventory = inventory
        self._subscribed = subscribed

    async def run(self) -> None:
        """Until a snapshot is applied."""
        await self._subscribed.wait()  # bound first: nothing after the read can be missed
        taken_at, facts = await self._fetch()
        async with self._db.pool.acquire() as conn:
            applied = await catalogue_store.apply_snapshot(conn, facts, taken_at=taken_at)
        log.info("catalogue.snapshot_applied", products=len(facts), applied=applied)

    async def _fetch(self) -> tuple[datetime, list[ProductFact]]:
        delay = 0.2
        while True:
            try:
                return _snapshot_of((await self._inventory.get(SNAPSHOT_PATH)).json())
            except (UpstreamError, ValidationError, KeyError, TypeError, ValueError) as exc:
                log.warning("catalogue.snapshot_unavailable", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(SNAPSHOT_RETRY_MAX, delay * 2)


def _snapshot_of(body: Any) -> tuple[datetime, list[ProductFact]]:
    taken_at = datetime.fromisoformat(body["taken_at"])
    return taken_at, [fact_of(p) for p in body["products"]]


# -- this instance's copy, for quoting ------------------------------------------------------


class CatalogueView:
    """The replica as this instance last read it: what ``POST /orders`` quotes from.

    >>> view = CatalogueView(db, interval=0.5)
    >>> tasks.supervise(view.run, name="catalogue-view")
    >>> view.quote(lines)          # Quote, or Rejected for an unknown SKU once filled
    """

    def __init__(self, db: Database, *, interval: float) -> None:
        self.products: dict[str, ProductFact] = {}
        self.filled = False  # a snapshot has been applied to the replica
        self._db = db
        self._interval = interval
        self._seen = 0  # the highest applied_seq read

    def quote(self, lines: Sequence[Line]) -> Quote:
        """The replica's prices for ``lines`` (see :func:`order.domain.quote`)."""
        return quote(lines, self.products, filled=self.filled)

    async def run(self) -> None:
        """Refresh for the life of the service; waits out database outages."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.debug("catalogue.refresh_waiting", error=str(exc))
            await asyncio.sleep(self._interval)

    async def refresh(self) -> None:
        """Read what the replica wrote since the last refresh."""
        async with self._db.pool.acquire() as conn:
            row = await catalogue_store.changed_since(conn, self._seen)
        for data in orjson.loads(row["products"]):
            fact = fact_of(data, _time(data["changed_at"]))
            self.products[fact.sku] = fact
        self._seen = row["seq"] or self._seen
        self.filled = row["snapshot_at"] is not None


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def start_catalogue(
    ctx: ServiceContext, metrics: ConsumerMetrics, *, refresh: float
) -> CatalogueView:
    """Consume, fill and mirror the replica for the life of the service (counted in the
    service's ``metrics``)."""
    consumer = EventConsumer(ctx.db, ctx.broker, catalogue_subscription(), metrics=metrics)
    ctx.tasks.supervise(consumer.run, name=f"consumer:{CATALOGUE_QUEUE}")
    fill = SnapshotFill(ctx.db, ctx.clients.inventory, consumer.subscribed)
    ctx.tasks.supervise(fill.run, name="catalogue-snapshot")
    view = CatalogueView(ctx.db, interval=refresh)
    ctx.tasks.supervise(view.run, name="catalogue-view")
    return view
