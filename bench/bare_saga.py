"""The baseline of the saga figures: the seed's in-memory saga, ported.

Four FastAPI apps, each in its own uvicorn process (uvloop + httptools): an order app and
three downstream apps (inventory, payment, shipping). The order app keeps its orders in
memory and makes the platform's four hops, in turn, with one plain ``aiohttp`` session:
reserve stock, charge, ship, commit the stock; each downstream call is one small Postgres
transaction in a throwaway database, over a pool built by the platform's own
:class:`~ordermesh_shared.database.Database` (same size and settings, its pool reset
turned off included). When a step says no, the steps already done are undone in reverse,
in memory (as the seed did). There is no saga persistence, idempotency, outbox, breaker,
retry or discovery: this is the floor the real platform's extra work is measured against.

The order API has the real one's shape (``POST /orders`` with the same body, 201 with
``{id, status, total, failure_reason}``; ``GET /orders/{id}``), so the same load drivers
(``bench/saga.py``, ``ordermesh_deploy.load``) run against both.

    uv run python -m bench.bare_saga          # start it, print the order URL; Ctrl-C stops it
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ordermesh_deploy.local import free_port
from ordermesh_shared.database import Database
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parent.parent
DOWNSTREAM = ("inventory", "payment", "shipping")
POOL_MAX = 10  # the services' default DB_POOL_MAX (a smaller pool costs it ~25% throughput)

SCHEMA = """
CREATE TABLE products (sku text PRIMARY KEY, price numeric(12, 2) NOT NULL,
                       available integer NOT NULL CHECK (available >= 0));
CREATE TABLE reservations (order_id uuid PRIMARY KEY, status text NOT NULL, items jsonb NOT NULL);
CREATE TABLE customers (id text PRIMARY KEY, balance numeric(12, 2) NOT NULL CHECK (balance >= 0));
CREATE TABLE payments (order_id uuid PRIMARY KEY, customer_id text NOT NULL,
                       amount numeric(12, 2) NOT NULL, status text NOT NULL);
CREATE TABLE destinations (code text PRIMARY KEY, supported boolean NOT NULL);
CREATE TABLE shipments (order_id uuid PRIMARY KEY, destination text NOT NULL);
-- The real services' demo data (prices, balances, destinations).
INSERT INTO products VALUES ('KB-101', 89.00, 100), ('MS-202', 25.50, 200),
    ('MN-303', 249.00, 30), ('CB-404', 9.99, 1000), ('HP-505', 179.00, 5), ('LS-606', 39.00, 0);
INSERT INTO customers VALUES ('alice', 100000.00), ('bob', 5000.00), ('carol', 500.00),
    ('dave', 20.00);
INSERT INTO destinations VALUES ('DE', true), ('FR', true), ('NL', true), ('GB', true),
    ('US', true), ('CA', true), ('JP', true), ('AQ', false), ('BV', false), ('HM', false);
"""


# -- the four apps -----------------------------------------------------------------------------


class Line(BaseModel):
    """One order line, validated like the real API's."""

    model_config = ConfigDict(extra="forbid")
    sku: str = Field(min_length=1, max_length=32)
    quantity: int = Field(ge=1, le=100)


class OrderRequest(BaseModel):
    """The body of ``POST /orders`` (the real API's shape)."""

    model_config = ConfigDict(extra="forbid")
    customer_id: str = Field(min_length=1, max_length=64)
    items: list[Line] = Field(min_length=1, max_length=20)
    destination: str = Field(min_length=2, max_length=2)


class ReserveRequest(BaseModel):
    order_id: uuid.UUID
    items: list[Line]


class ChargeRequest(BaseModel):
    order_id: uuid.UUID
    customer_id: str
    amount: Decimal


class ShipRequest(BaseModel):
    order_id: uuid.UUID
    destination: str


class Refused(Exception):
    """A business "no": rolls the transaction back and answers 409 with the reason."""


def _refused(_request: Any, exc: Exception) -> JSONResponse:
    return JSONResponse({"reason": str(exc)}, status_code=409)


def downstream_app(role: str, dsn: str) -> FastAPI:
    """One downstream app: its routes over one asyncpg pool."""
    state: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The platform's pool, not a pool of our own: a difference in pool settings (asyncpg's
        # reset on release costs 5-10% of a saga's CPU) would be measured as the platform's.
        async with Database(dsn, max_size=POOL_MAX) as database:
            await database.migrate()  # no migration sets: the schema is bare_saga's SCHEMA
            state["pool"] = database.pool
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_exception_handler(Refused, _refused)
    app.add_api_route("/health", _health)
    ROUTES[role](app, lambda: state["pool"])
    return app


async def _health() -> dict[str, str]:
    return {"status": "ok"}


PoolOf = Callable[[], asyncpg.Pool]


def inventory_routes(app: FastAPI, pool: PoolOf) -> None:
    @app.post("/reserve", status_code=201)
    async def reserve(body: ReserveRequest) -> dict[str, str]:
        total = Decimal(0)
        async with pool().acquire() as conn, conn.transaction():
            # SKU order: concurrent reservations lock product rows in one order (no deadlock).
            for line in sorted(body.items, key=lambda item: item.sku):
                price = await conn.fetchval(
                    "UPDATE products SET available = available - $2"
                    " WHERE sku = $1 AND available >= $2 RETURNING price",
                    line.sku,
                    line.quantity,
                )
                if price is None:
                    raise Refused("out_of_stock")
                total += price * line.quantity
            items = [line.model_dump() for line in body.items]
            await conn.execute(
                "INSERT INTO reservations VALUES ($1, 'reserved', $2::jsonb)",
                body.order_id,
                _json(items),
            )
        return {"total": str(total)}

    @app.post("/release/{order_id}")
    async def release(order_id: uuid.UUID) -> dict[str, str]:
        async with pool().acquire() as conn, conn.transaction():
            items = await conn.fetchval(
                "UPDATE reservations SET status = 'released'"
                " WHERE order_id = $1 AND status = 'reserved' RETURNING items",
                order_id,
            )
            # SKU order, as reserve locks them: no deadlock between the two.
            for line in sorted(orjson.loads(items or "[]"), key=lambda item: item["sku"]):
                await conn.execute(
                    "UPDATE products SET available = available + $2 WHERE sku = $1",
                    line["sku"],
                    line["quantity"],
                )
        return {"status": "released"}

    @app.post("/commit/{order_id}")
    async def commit(order_id: uuid.UUID) -> dict[str, str]:
        async with pool().acquire() as conn:
            # One statement, so one (implicit) transaction, as the platform's commit.
            await conn.execute(
                "UPDATE reservations SET status = 'committed'"
                " WHERE order_id = $1 AND status = 'reserved'",
                order_id,
            )
        return {"status": "committed"}


def payment_routes(app: FastAPI, pool: PoolOf) -> None:
    @app.post("/charge", status_code=201)
    async def charge(body: ChargeRequest) -> dict[str, str]:
        async with pool().acquire() as conn, conn.transaction():
            paid = await conn.fetchval(
                "UPDATE customers SET balance = balance - $2"
                " WHERE id = $1 AND balance >= $2 RETURNING 1",
                body.customer_id,
                body.amount,
            )
            if paid is None:
                raise Refused("insufficient_funds")
            await conn.execute(
                "INSERT INTO payments VALUES ($1, $2, $3, 'charged')",
                body.order_id,
                body.customer_id,
                body.amount,
            )
        return {"status": "charged"}

    @app.post("/refund/{order_id}")
    async def refund(order_id: uuid.UUID) -> dict[str, str]:
        async with pool().acquire() as conn, conn.transaction():
            await conn.execute(
                "WITH back AS (UPDATE payments SET status = 'refunded'"
                "  WHERE order_id = $1 AND status = 'charged' RETURNING customer_id, amount)"
                " UPDATE customers c SET balance = balance + back.amount"
                " FROM back WHERE c.id = back.customer_id",
                order_id,
            )
        return {"status": "refunded"}


def shipping_routes(app: FastAPI, pool: PoolOf) -> None:
    @app.post("/ship", status_code=201)
    async def ship(body: ShipRequest) -> dict[str, str]:
        async with pool().acquire() as conn:
            # One statement, so one (implicit) transaction.
            shipped = await conn.fetchval(
                "INSERT INTO shipments SELECT $1, code FROM destinations"
                " WHERE code = $2 AND supported RETURNING 1",
                body.order_id,
                body.destination,
            )
        if shipped is None:
            raise Refused("unsupported_destination")
        return {"status": "created"}


ROUTES: dict[str, Callable[[FastAPI, PoolOf], None]] = {
    "inventory": inventory_routes,
    "payment": payment_routes,
    "shipping": shipping_routes,
}


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass
class Downstream:
    """The order app's view of the three apps: one session, their base URLs."""

    session: aiohttp.ClientSession
    urls: dict[str, str]

    async def post(self, role: str, path: str, body: BaseModel | None = None) -> dict[str, Any]:
        """POST and return the JSON answer; a 409 becomes Refused(reason)."""
        data = None if body is None else body.model_dump_json()
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.urls[role] + path, data=data, headers=headers) as r:
            if r.status == 409:
                raise Refused((await r.json())["reason"])
            r.raise_for_status()
            answer: dict[str, Any] = await r.json()
            return answer


async def run_saga(down: Downstream, order: dict[str, Any], body: OrderRequest) -> None:
    """Reserve -> charge -> ship -> commit; on a "no" (or a fault) before the shipment, undo
    what was done, in reverse. The commit comes after the point of no return (as the
    platform's ``commit_stock``): it cannot be refused, and has no undo."""
    order_id = uuid.UUID(order["id"])
    undo: list[Callable[[], Awaitable[dict[str, Any]]]] = []
    try:
        reserve = ReserveRequest(order_id=order_id, items=body.items)
        reserved = await down.post("inventory", "/reserve", reserve)
        order["total"] = reserved["total"]
        undo.append(lambda: down.post("inventory", f"/release/{order_id}"))
        charge = ChargeRequest(
            order_id=order_id, customer_id=body.customer_id, amount=Decimal(reserved["total"])
        )
        await down.post("payment", "/charge", charge)
        undo.append(lambda: down.post("payment", f"/refund/{order_id}"))
        ship = ShipRequest(order_id=order_id, destination=body.destination)
        await down.post("shipping", "/ship", ship)
    except (Refused, aiohttp.ClientError) as exc:
        for step in reversed(undo):
            # The seed logged a failed undo and moved on: no retries, no parking.
            with contextlib.suppress(aiohttp.ClientError):
                await step()
        order.update(status="cancelled", failure_reason=str(exc))
        return
    await down.post("inventory", f"/commit/{order_id}")
    order["status"] = "completed"


def order_app(urls: dict[str, str]) -> FastAPI:
    """The order app: orders in memory, the saga over plain aiohttp."""
    orders: dict[str, dict[str, Any]] = {}
    state: dict[str, Downstream] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            state["down"] = Downstream(session, urls)
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_api_route("/health", _health)

    @app.post("/orders", status_code=201)
    async def place_order(body: OrderRequest) -> JSONResponse:
        order: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "status": "pending",
            "total": None,
            "failure_reason": None,
        }
        orders[order["id"]] = order
        await run_saga(state["down"], order, body)
        return JSONResponse(order, status_code=201)

    @app.get("/orders/{order_id}")
    async def get_order(order_id: str) -> JSONResponse:
        order = orders.get(order_id)
        if order is None:
            return JSONResponse({"detail": "no such order"}, status_code=404)
        return JSONResponse(order)

    return app


def serve(role: str, port: int, dsn: str, peers: dict[str, str]) -> None:
    """Run one app in this process (the child side of :func:`bare_saga`)."""
    app = order_app(peers) if role == "order" else downstream_app(role, dsn)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


# -- running it ------------------------------------------------------------------------------


@dataclass
class BareSaga:
    """A running bare saga: its order URL, database and processes."""

    url: str
    dsn: str
    processes: dict[str, subprocess.Popen[bytes]]

    @property
    def pids(self) -> dict[str, int]:
        """Process id by app name (for CPU accounting and profiling)."""
        return {role: p.pid for role, p in self.processes.items()}

    async def top_up(self, *, units: int, money: Decimal) -> None:
        """More stock on every product and more money for every customer."""
        conn = await connect(self.dsn)
        try:
            await conn.execute("UPDATE products SET available = available + $1", units)
            await conn.execute("UPDATE customers SET balance = balance + $1", money)
        finally:
            await conn.close()


async def connect(dsn: str, *, attempts: int = 10, **options: Any) -> asyncpg.Connection:
    """A connection, waiting a little for a free slot: the server is shared with whatever
    else runs on the machine, and its connection limit is often nearly reached."""
    for attempt in range(1, attempts + 1):
        try:
            connection: asyncpg.Connection = await asyncpg.connect(dsn, timeout=5, **options)
            return connection
        except asyncpg.TooManyConnectionsError:
            if attempt == attempts:
                raise
            await asyncio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


@asynccontextmanager
async def bare_saga(postgres_url: str) -> AsyncIterator[BareSaga]:
    """Create a throwaway database, start the four apps; stop them and drop it on exit."""
    server = postgres_url.rstrip("/")
    name = f"om_bench_bare_{uuid.uuid4().hex[:8]}"
    await _admin(server, f'CREATE DATABASE "{name}"')
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        dsn = f"{server}/{name}"
        conn = await connect(dsn)
        try:
            await conn.execute(SCHEMA)
        finally:
            await conn.close()
        urls = {role: f"http://127.0.0.1:{free_port()}" for role in (*DOWNSTREAM, "order")}
        for role in (*DOWNSTREAM, "order"):
            processes[role] = _spawn(role, urls, dsn)
        await _wait_healthy(urls, processes)
        yield BareSaga(urls["order"], dsn, processes)
    finally:
        _stop(processes)
        await _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(server: str, sql: str) -> None:
    conn = await connect(f"{server}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _spawn(role: str, urls: dict[str, str], dsn: str) -> subprocess.Popen[bytes]:
    port = urls[role].rsplit(":", 1)[1]
    peers = [f"{r}={urls[r]}" for r in DOWNSTREAM]
    command = [sys.executable, "-m", "bench.bare_saga", "serve", role, port, dsn, *peers]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def _wait_healthy(
    urls: dict[str, str], processes: dict[str, subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        for role, url in urls.items():
            while not await _healthy(session, url):
                if processes[role].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the bare saga's {role} app did not start")
                await asyncio.sleep(0.1)


async def _healthy(session: aiohttp.ClientSession, url: str) -> bool:
    with contextlib.suppress(aiohttp.ClientError):
        async with session.get(f"{url}/health") as answer:
            return answer.status == 200
    return False


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        process.terminate()
    for process in processes.values():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _demo(postgres_url: str) -> None:
    async with bare_saga(postgres_url) as bare:
        print(f"bare saga order API: {bare.url}  (Ctrl-C stops it)", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    """``serve ROLE PORT DSN [role=url ...]`` (child processes) or no argument (demo)."""
    if argv[:1] == ["serve"]:
        role, port, dsn, *peers = argv[1:]
        serve(role, int(port), dsn, dict(p.split("=", 1) for p in peers))
        return
    url = os.environ.get("POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_demo(url))


if __name__ == "__main__":
    main(sys.argv[1:])
