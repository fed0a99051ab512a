"""The round-trip budget (issue 17, item 5): how many database round trips one successful
order costs each service, failing above a named budget.

The four services run in-process, each on a database of its own reached through its own
:class:`CountingPgProxy`; the participants listen on loopback ports, so the order service
calls them through the real ServiceClient. Counted separately:

* the request path: the order service's saga work (from ``POST /orders`` to its answer,
  which waits for the saga) and the participants' four commands (reserve, charge, ship,
  commit stock), with ``OUTBOX_RELAY=off`` so no relay runs meanwhile;
* the relay: one batch per service, run by hand through a proxy of its own, publishing the
  events that order wrote to the outbox;
* the consumer: the order service's timeline consumer applying those events.

Counts are of a warm service: one order runs first and is not measured, and work asyncpg
does only on a connection that has not run a statement before (preparing it, type lookups:
``RoundTrip.cache_miss``) is shown apart, as which pooled connection a statement lands on is
chance. Three orders are measured and must cost the same. ``pytest -s`` prints the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from order.app import OrderSettings, order_spec
from ordermesh_shared.bootstrap import ServiceSpec
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.database import Database
from ordermesh_shared.outbox.relay import OutboxRelay
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from shipping.app import SPEC as SHIPPING
from shipping.app import ShippingSettings

from tests.support.apps import context_of, running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.pg_proxy import CountingPgProxy, RoundTrip
from tests.support.postgres import create_database, drop_database

pytestmark = pytest.mark.integration

# Round trips one order costs a warm service, as measured at 2ec8e47 (inventory's commands
# in two round trips; it was 16 before): any regression fails, and each improvement should
# lower its number here. The target is at most 20 for the whole request path (all
# four services together); today it is 35.
REQUEST_PATH_BUDGET = {"order": 15, "inventory": 4, "payment": 8, "shipping": 8}
REQUEST_PATH_TARGET = 20
# One relay batch per service, whatever it carries: BEGIN, claim, mark published, COMMIT.
RELAY_BUDGET = {"order": 4, "inventory": 4, "payment": 4, "shipping": 4}
# The timeline consumer: BEGIN, inbox rows, timeline rows, COMMIT per batch of events; how
# events fall into batches is the broker's timing, so the bound is a batch of one per event.
CONSUMER_BUDGET_PER_EVENT = 4
MEASURED_ORDERS = 3

SERVICES = ("order", "inventory", "payment", "shipping")
PARTICIPANTS: tuple[tuple[str, type[ServiceSettings], ServiceSpec], ...] = (
    ("inventory", InventorySettings, INVENTORY),
    ("payment", PaymentSettings, PAYMENT),
    ("shipping", ShippingSettings, SHIPPING),
)
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")
ORDER = {"customer_id": "alice", "items": [{"sku": "CB-404", "quantity": 1}], "destination": "DE"}
# Timers here are long where settings allow (saga heartbeat and recovery: LEASE_TTL / 3 and
# / 2, the retention pruner), so they stay out of a measurement. Presence (readiness checks:
# a ping and the outbox lag, each second) and the outbox monitor (every 5 s) are not
# settable: their statements are learnt while idle and left out of every count.
SETTINGS: dict[str, Any] = {
    "outbox_relay": "off",
    "db_pool_max": 2,  # Postgres is shared with other test runs (100 connections)
    "prune_interval": 86400.0,
}
IDLE_LEARNING = 2.5  # seconds: two presence rounds


@dataclass
class Measured:
    """One order's round trips, by service and by what caused them (background left out)."""

    request: dict[str, list[RoundTrip]] = field(default_factory=dict)
    relay: dict[str, list[RoundTrip]] = field(default_factory=dict)
    consumer: list[RoundTrip] = field(default_factory=list)
    events: int = 0

    def warm(self, service: str) -> int:
        return sum(not trip.cache_miss for trip in self.request[service])

    def misses(self, service: str) -> int:
        return sum(trip.cache_miss for trip in self.request[service])


@dataclass
class Stack:
    """The four services, their proxies, the test's relays and what is background."""

    order: httpx.AsyncClient
    proxies: dict[str, CountingPgProxy]
    relays: dict[str, tuple[OutboxRelay, CountingPgProxy]]
    order_db: asyncpg.Connection  # not through a proxy: the test's own look
    background: frozenset[str] = frozenset()
    published: int = 0

    def reset(self) -> None:
        for proxy in [*self.proxies.values(), *(p for _, p in self.relays.values())]:
            proxy.reset_counts()

    def attributable(self, proxy: CountingPgProxy) -> list[RoundTrip]:
        return [trip for trip in proxy.trips if trip.sql not in self.background]


async def test_one_order_stays_within_its_round_trip_budget(rabbit_vhost: str) -> None:
    async with four_services(rabbit_vhost) as stack:
        stack.background = await learn_background(stack)
        await place_and_relay(stack)  # warms each pool's statement cache
        runs = [await place_and_relay(stack) for _ in range(MEASURED_ORDERS)]
    report = describe(runs)
    print(report)
    for service in SERVICES:
        counts = [run.warm(service) for run in runs]
        assert len(set(counts)) == 1, f"{service}: the same order cost {counts}\n{report}"
        assert counts[0] <= REQUEST_PATH_BUDGET[service], f"{service} over budget\n{report}"
        relayed = [len(run.relay[service]) for run in runs]
        assert max(relayed) <= RELAY_BUDGET[service], f"{service} relay over budget\n{report}"
    for run in runs:
        bound = CONSUMER_BUDGET_PER_EVENT * run.events
        assert len(run.consumer) <= bound, f"consumer over {bound}\n{report}"


async def place_and_relay(stack: Stack) -> Measured:
    """One order through the request path, then its events through the relays and the
    consumer, each phase counted on its own."""
    measured = Measured()
    stack.reset()
    placed = await stack.order.post("/orders", json=ORDER)
    assert placed.status_code == 201, placed.text  # answered once the saga ended
    assert placed.json()["status"] == "completed", placed.json()
    await asyncio.sleep(0.2)  # anything still on its way to the database lands first
    measured.request = {s: stack.attributable(p) for s, p in stack.proxies.items()}
    for service, (relay, proxy) in stack.relays.items():
        stack.reset()
        batch = await relay.relay_batch(token=0)
        assert batch.published == batch.claimed > 0, batch
        measured.events += batch.published
        stack.published += batch.published
        await consumed(stack.order_db, stack.published)
        measured.relay[service] = stack.attributable(proxy)
        measured.consumer += stack.attributable(stack.proxies["order"])
    return measured


async def consumed(conn: asyncpg.Connection, events: int, within: float = 10.0) -> None:
    """Until the timeline consumer has applied ``events`` events in all."""
    async with asyncio.timeout(within):
        while await conn.fetchval("SELECT count(*) FROM inbox") < events:
            await asyncio.sleep(0.02)


async def learn_background(stack: Stack) -> frozenset[str]:
    """The statements the services' timers run while nothing happens."""
    stack.reset()
    await asyncio.sleep(IDLE_LEARNING)
    seen = {trip.sql for proxy in stack.proxies.values() for trip in proxy.trips}
    # Left out by their text: a timer in a transaction would hide the orders' BEGINs too.
    assert not any(sql.strip().upper().startswith(TRANSACTION_CONTROL) for sql in seen), seen
    return frozenset(seen)


def describe(runs: Sequence[Measured]) -> str:
    """The table, then the SQL of the last order, service by service."""
    last = runs[-1]
    lines = [
        "",
        "round trips per order (warm; cache misses apart), runs: "
        + ", ".join(str(sum(run.warm(s) for s in SERVICES)) for run in runs),
        f"{'service':<10} {'request':>8} {'budget':>7} {'misses':>7} {'relay':>6}",
    ]
    for service in SERVICES:
        lines.append(
            f"{service:<10} {last.warm(service):>8} {REQUEST_PATH_BUDGET[service]:>7}"
            f" {last.misses(service):>7} {len(last.relay[service]):>6}"
        )
    total = sum(last.warm(s) for s in SERVICES)
    lines.append(
        f"{'all':<10} {total:>8} {sum(REQUEST_PATH_BUDGET.values()):>7}"
        f"  (target <= {REQUEST_PATH_TARGET})"
    )
    transactions = sum(trip.sql.strip().upper().startswith("BEGIN") for trip in last.consumer)
    lines.append(
        f"consumer: {len(last.consumer)} round trips, {transactions} transactions,"
        f" {last.events} events"
    )
    for service in SERVICES:
        lines.append(f"-- {service}, request path:")
        lines.extend(_sql_lines(last.request[service]))
    lines.append("-- order, relay batch (the other services' relays run the same SQL):")
    lines.extend(_sql_lines(last.relay["order"]))
    lines.append("-- order, timeline consumer:")
    lines.extend(_sql_lines(last.consumer))
    return "\n".join(lines)


def _sql_lines(trips: Sequence[RoundTrip]) -> Iterator[str]:
    for trip in trips:
        text = " ".join(trip.sql.split())
        yield f"   {trip.kind:<8} {text[:160]}"


# -- the stack -----------------------------------------------------------------------------


@asynccontextmanager
async def four_services(vhost: str) -> AsyncIterator[Stack]:
    """Order, inventory, payment and shipping, ready and registered, each on its own
    database through its own counting proxy."""
    registry = InMemoryRegistry()
    async with AsyncExitStack() as stack:
        dsns = {s: await own_database(stack, s) for s in SERVICES}
        proxies = {s: await stack.enter_async_context(CountingPgProxy(dsns[s])) for s in SERVICES}
        clients = {}
        for name, settings_cls, spec in PARTICIPANTS:
            listening = stack.enter_context(loopback_socket())
            settings = settings_cls(
                database_url=proxies[name].dsn,
                rabbitmq_url=vhost,
                port=listening.getsockname()[1],
                **SETTINGS,
            )
            client = await stack.enter_async_context(running(spec, settings, registry))
            await stack.enter_async_context(serving(client, listening))
            clients[name] = client
        settings = OrderSettings(
            database_url=proxies["order"].dsn,
            rabbitmq_url=vhost,
            order_wait=10.0,
            saga_lease_ttl=120.0,
            **SETTINGS,
        )
        clients["order"] = order = await stack.enter_async_context(
            running(order_spec(settings), settings, registry)
        )
        for client in clients.values():
            await wait_ready(client)
        async with asyncio.timeout(10):
            while not all(registry.instances(name) for name, _, _ in PARTICIPANTS):
                await asyncio.sleep(0.05)
        relays = {s: await relay_of(stack, clients[s], dsns[s]) for s in SERVICES}
        order_db = await asyncpg.connect(dsns["order"])
        stack.push_async_callback(order_db.close)
        yield Stack(order, proxies, relays, order_db)


async def own_database(stack: AsyncExitStack, service: str) -> str:
    name = f"om_rt_{service}_{uuid.uuid4().hex[:8]}"
    dsn = await create_database(name)
    stack.push_async_callback(drop_database, name)
    return dsn


async def relay_of(
    stack: AsyncExitStack, client: httpx.AsyncClient, dsn: str
) -> tuple[OutboxRelay, CountingPgProxy]:
    """The service's relay (as OUTBOX_RELAY=standalone runs it) on a pool of its own,
    through a proxy of its own, sharing the service's broker connection."""
    ctx = context_of(client)
    proxy = await stack.enter_async_context(CountingPgProxy(dsn))
    db = await stack.enter_async_context(Database(proxy.dsn, max_size=1))
    await db.migrate()  # nothing to apply: the service migrated its database
    return OutboxRelay(db, ctx.broker, service=ctx.instance.service), proxy


@contextlib.contextmanager
def loopback_socket() -> Iterator[socket.socket]:
    """A listening socket on a free loopback port (bound before the service learns it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


class _InTestServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # pytest owns SIGINT; a server inside a test must not take it over


@asynccontextmanager
async def serving(client: httpx.AsyncClient, sock: socket.socket) -> AsyncIterator[None]:
    """Serve the app behind ``client`` (its lifespan already running) over real HTTP."""
    transport: httpx.ASGITransport = client.app_transport  # type: ignore[attr-defined]
    config = uvicorn.Config(
        transport.app, lifespan="off", log_config=None, log_level="warning", access_log=False
    )
    server = _InTestServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="participant-http")
    try:
        yield
    finally:
        server.should_exit = True
        await task
