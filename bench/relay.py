"""Outbox relay throughput against the broker's own ceiling and the seed's design, and the
commit -> consumer latency at steady rates (``--latency-rates``; bench/run.py: 1,000 and 500).

Throughput variants (each moves ``--events`` outbox rows / messages; ``--runs`` interleaved
runs, median kept, so a noisy neighbour hurts all alike):

* ``broker``  raw aio-pika: the same CloudEvents messages published with pipelined confirms
              (windows of ``--batch``), mandatory, persistent; no database. The ceiling.
* ``relay``   :class:`OutboxRelay` running as in a service: its batches (claim SKIP LOCKED,
              pipelined confirms, fence, mark) two at a time; timed until every row is marked.
* ``seed``    the seed's worker: select 100 unpublished rows, publish one at a time (awaiting
              each confirm), update each row on its own.

In the throughput runs messages land in a durable quorum queue bound to ``#`` (what
consumers use), purged between runs. The latency run (:func:`latency`) puts a producer and a
consumer process (its own queue, ``bench.latency`` bound to ``bench.*``, deleted between runs)
around our relay or, as the baseline, the seed's worker on a ``SEED_POLL`` ticker
(:func:`seed_polling_relay`); ``bench/run.py`` runs both. Everything runs in a private
vhost and a scratch database, both removed afterwards.

    uv run python bench/relay.py                    # table + bench/results/relay.json
    uv run python bench/relay.py --events 20000 --runs 5 --latency-rates 1000 --latency-seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractExchange
from ordermesh_shared.database import SHARED_MIGRATIONS, Database
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.messaging.envelope import OutgoingEvent, encode_event
from ordermesh_shared.messaging.topology import Topology, declare_consumer_queue
from ordermesh_shared.outbox import add_event
from ordermesh_shared.outbox.metrics import OutboxMetrics
from ordermesh_shared.outbox.relay import OutboxRelay, RelaySettings, SoleLeader
from ordermesh_shared.outbox.wiring import relay_fence
from prometheus_client import CollectorRegistry

RESULTS = Path(__file__).resolve().parent / "results" / "relay.json"
# The tests' admin DSN (make sets it from .run/local.env) unless the benchmark gets its own.
PG_ADMIN = (
    os.environ.get("ORDERMESH_BENCH_PG")
    or os.environ.get("ORDERMESH_TEST_PG")
    or "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP = os.environ.get("ORDERMESH_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
SERVICE = "bench"
PAYLOAD = {"order_id": "7b1f3c2e-0000-4000-8000-000000000001", "sku": "KB-101", "quantity": 2}
Variant = Callable[["Bench", int], Awaitable[float]]
# The seed calls ProcessOutbox from "a background worker" without saying how often; 100 ms
# is our choice (shorter than the usual 1 s ticker, so it favours the seed).
SEED_POLL = 0.1
LATENCY_QUEUE = "bench.latency"


class Bench:
    """The scratch database, the broker connection and the queue all variants share."""

    def __init__(self, db: Database, broker: Broker, *, amqp_url: str, batch: int) -> None:
        self.db = db
        self.broker = broker
        self.amqp_url = amqp_url
        self.batch = batch
        self.aggregates = 1000
        self.queue: aio_pika.abc.AbstractQueue | None = None
        self.exchange: AbstractExchange | None = None

    async def prepare(self) -> None:
        channel = await self.broker.connection.channel()
        self.queue = await declare_consumer_queue(channel, Topology(), "bench.sink", ["#"])
        confirm = await self.broker.connection.channel(on_return_raises=True)
        self.exchange = await confirm.get_exchange(Topology().events_exchange)

    async def reset(self) -> None:
        assert self.queue is not None
        await self.queue.purge()
        # The latency consumer's queue too: a message left from an earlier run would count
        # toward the next run's total.
        channel = await self.broker.connection.channel()
        try:
            await channel.queue_delete(LATENCY_QUEUE)
        finally:
            await channel.close()
        async with self.db.pool.acquire() as conn:
            await conn.execute("TRUNCATE outbox, inbox, fencing_tokens")
            await conn.execute("DROP TABLE IF EXISTS bench_latency, bench_committed")

    async def fill_outbox(self, count: int) -> None:
        """``count`` unpublished rows over ``aggregates`` aggregates (not timed)."""
        async with self.db.pool.acquire() as conn, conn.transaction():
            for i in range(count):
                await add_event(
                    conn,
                    aggregate_type="order",
                    aggregate_id=f"o{i % self.aggregates}",
                    event_type="order_created",
                    payload=PAYLOAD,
                )


async def run_broker(bench: Bench, count: int) -> float:
    assert bench.exchange is not None
    exchange = bench.exchange
    messages = [encode_event(_outgoing(i), service=SERVICE) for i in range(count)]
    started = time.perf_counter()
    for window in range(0, count, bench.batch):
        chunk = messages[window : window + bench.batch]
        await asyncio.gather(*(exchange.publish(m, "bench.order_created") for m in chunk))
    return time.perf_counter() - started


async def run_relay(bench: Bench, count: int) -> float:
    """The relay's own loop (pipelined batches, fence and all) until every row is marked."""
    await bench.fill_outbox(count)
    settings = RelaySettings(batch_size=bench.batch)
    registry = CollectorRegistry()
    relay = OutboxRelay(
        bench.db,
        bench.broker,
        service=SERVICE,
        fence=relay_fence(SERVICE),
        settings=settings,
        metrics=OutboxMetrics(registry),
    )
    started = time.perf_counter()
    async with _running(relay.run(_Elected())):
        while True:  # the relay's own counter (marked rows), read in-process: no queries
            if (registry.get_sample_value("outbox_events_published_total") or 0) >= count:
                return time.perf_counter() - started
            await asyncio.sleep(0.002)


async def run_seed(bench: Bench, count: int) -> float:
    """The seed's ProcessOutbox, faithfully: 100 rows, one publish and one update at a time."""
    await bench.fill_outbox(count)
    started = time.perf_counter()
    async with bench.db.pool.acquire() as conn:
        while await seed_pass(bench, conn):
            pass
    return time.perf_counter() - started


async def seed_pass(bench: Bench, conn: asyncpg.Connection) -> int:
    """One call of the seed's ProcessOutbox; the number of rows it found."""
    assert bench.exchange is not None
    rows = await conn.fetch(
        "SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload::text,"
        " created_at FROM outbox WHERE published_at IS NULL ORDER BY created_at LIMIT 100"
    )
    for row in rows:
        message = encode_event(_from_row(row), service=SERVICE)
        try:
            await bench.exchange.publish(message, f"{SERVICE}.{row['event_type']}")
        except aio_pika.exceptions.AMQPError:
            continue  # "retry later", as the seed does
        await conn.execute("UPDATE outbox SET published_at = now() WHERE id = $1", row["id"])
    return len(rows)


async def seed_polling_relay(bench: Bench, *, every: float = SEED_POLL) -> None:
    """The seed's background worker: ProcessOutbox on a ticker (a pass that overruns the
    tick starts the next one at once, as a Go ``time.Ticker`` would); runs until cancelled."""
    async with bench.db.pool.acquire() as conn:
        while True:
            started = time.perf_counter()
            await seed_pass(bench, conn)
            await asyncio.sleep(max(0.0, every - (time.perf_counter() - started)))


def _outgoing(i: int) -> OutgoingEvent:
    return OutgoingEvent(
        id=uuid.uuid4(),
        sequence=i,
        aggregate_type="order",
        aggregate_id=f"o{i % 100}",
        event_type="order_created",
        payload=PAYLOAD,
        created_at=datetime.now(UTC),
    )


def _from_row(row: asyncpg.Record) -> OutgoingEvent:
    return OutgoingEvent(
        id=row["event_id"],
        sequence=row["id"],
        aggregate_type=row["aggregate_type"],
        aggregate_id=row["aggregate_id"],
        event_type=row["event_type"],
        payload=orjson.loads(row["payload"]),
        created_at=row["created_at"],
    )


VARIANTS: dict[str, Variant] = {"broker": run_broker, "relay": run_relay, "seed": run_seed}


async def throughput(bench: Bench, *, events: int, runs: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for run in range(runs):
        for name, variant in VARIANTS.items():  # interleaved: noise hits every variant
            await bench.reset()
            cpu = time.process_time()
            elapsed = await variant(bench, events)
            cpu = time.process_time() - cpu
            samples[name].append({"events_per_s": events / elapsed, "seconds": elapsed,
                                  "client_cpu_ms_per_event": 1000 * cpu / events})  # fmt: skip
            print(f"  run {run + 1} {name:<7} {events / elapsed:9.0f} events/s", file=sys.stderr)
    return {name: _summary(runs_) for name, runs_ in samples.items()}


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "events_per_s_median": round(statistics.median(r["events_per_s"] for r in runs)),
        "client_cpu_ms_per_event_median": round(
            statistics.median(r["client_cpu_ms_per_event"] for r in runs), 4
        ),
        "runs_events_per_s": [round(r["events_per_s"]) for r in runs],
    }


# Producer and consumer run as processes of their own, as they would in the platform (the
# relay runs here, as in the producing service). Latency is from the producer's COMMIT
# returning to the consumer's handler, both read off the machine's wall clock; each side keeps
# its timestamps in memory and writes them after the run (a probe writing a row per event
# would double the consumer's database work and measure itself).
PRODUCER = """
import asyncio, sys, time
import asyncpg, uvloop
from ordermesh_shared.outbox import add_event

dsn, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
PAYLOAD = {"order_id": "7b1f3c2e-0000-4000-8000-000000000001", "sku": "KB-101", "quantity": 2}

async def main():
    total = int(rate * seconds)
    committed = []  # (event id, wall-clock time the COMMIT returned)
    async with asyncpg.create_pool(dsn, min_size=8, max_size=8) as pool:
        started = time.perf_counter()

        async def writer(offset):
            for i in range(offset, total, 8):  # 8 writers: one slow commit stalls nobody
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                async with pool.acquire() as conn:
                    async with conn.transaction():
                        event_id = await add_event(
                            conn, aggregate_type="order", aggregate_id=f"o{i % 1000}",
                            event_type="order_created", payload=PAYLOAD)
                    committed.append((str(event_id), time.time()))

        await asyncio.gather(*(writer(k) for k in range(8)))
        achieved = total / (time.perf_counter() - started)
        # Written after the run, so it does not load the measurement.
        await pool.execute("CREATE TABLE IF NOT EXISTS bench_committed (event_id text, at float8)")
        await pool.copy_records_to_table("bench_committed", records=committed)
        print(f"produced {total} {achieved:.1f}", flush=True)

uvloop.run(main())  # as the platform's services run
"""

CONSUMER = """
import asyncio, sys
import uvloop
from datetime import UTC, datetime
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.database import Database
from ordermesh_shared.messaging.consumer import EventConsumer, Subscription

dsn, amqp, queue, expected, limit = sys.argv[1:4] + [int(sys.argv[4]), float(sys.argv[5])]
received = {}  # event id -> when the handler ran: kept in memory, as the producer does
done = asyncio.Event()

async def record(conn, event):
    # Called inside the consumer's transaction (inbox row and all), before its commit; a
    # batch rolled back and applied again one by one calls it twice: the last call counts.
    received[event.id] = datetime.now(UTC)
    if len(received) >= expected:
        done.set()

async def main():
    async with Database(dsn) as db, Broker(amqp, name="bench-consumer") as broker:
        db.migrated = True  # the parent migrated it
        consumer = EventConsumer(db, broker, Subscription(queue, ["bench.*"], record))
        task = asyncio.create_task(consumer.run())
        await consumer.subscribed.wait()
        print("subscribed", flush=True)
        await asyncio.wait_for(done.wait(), limit)
        await asyncio.sleep(0.5)  # the last batch commits and acks
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # Written after the run, so it does not load the measurement.
        await db.pool.copy_records_to_table("bench_latency", records=list(received.items()))
        print("received", len(received), flush=True)

uvloop.run(main())  # as the platform's services run
"""


async def latency(
    bench: Bench, *, rate: float, seconds: float, relay: str = "ours"
) -> dict[str, Any]:
    """Commit -> consumer latency at ``rate`` events/s through our relay (woken by
    LISTEN/NOTIFY) or, with ``relay="seed"``, the seed's polling relay."""
    await bench.reset()
    async with bench.db.pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_latency (event_id text, received_at timestamptz)"
        )
    if relay == "seed":
        relaying = seed_polling_relay(bench)
    else:
        ours = OutboxRelay(bench.db, bench.broker, service=SERVICE, fence=relay_fence(SERVICE))
        relaying = ours.run(_Elected())
    total = int(rate * seconds)
    limit = str(seconds + 120)  # for the consumer to see every event, from its start
    consumer_args = (bench.db.dsn, bench.amqp_url, LATENCY_QUEUE, str(total), limit)
    async with _child(CONSUMER, *consumer_args) as consumer:
        await _expect(consumer, "subscribed")
        cpu = time.process_time()  # this process runs only the relay now
        async with _running(relaying):
            async with _child(PRODUCER, bench.db.dsn, str(rate), str(seconds)) as producer:
                produced = (await _expect(producer, "produced")).split()
            await _expect(consumer, "received")
        cpu = time.process_time() - cpu
    summary = await _latency_summary(bench.db, rate=rate, achieved=float(produced[2]))
    if summary["events"] != total:
        raise RuntimeError(f"latency run: {summary['events']} of {total} events measured")
    if relay == "seed":  # it marks each row after its confirm: not when it picked it up
        for point in ("p50", "p99"):
            summary[f"relay_marked_{point}_ms"] = summary.pop(f"relay_claimed_{point}_ms")
    summary["relay"] = relay
    summary["relay_cpu_ms_per_event"] = round(1000 * cpu / int(produced[1]), 3)
    return summary


_LATENCY_SQL = """
SELECT count(*) AS events,
       percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY commit_ms) AS commit_pct,
       max(commit_ms) AS commit_max,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY begin_ms) AS begin_pct,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY claimed_ms) AS claimed_pct
  FROM (SELECT (extract(epoch FROM l.received_at) - c.at) * 1000 AS commit_ms,
               extract(epoch FROM l.received_at - o.created_at) * 1000 AS begin_ms,
               (extract(epoch FROM o.published_at) - c.at) * 1000 AS claimed_ms
          FROM bench_latency l
          JOIN bench_committed c ON c.event_id = l.event_id
          JOIN outbox o ON o.event_id::text = l.event_id) d
"""


async def _latency_summary(db: Database, *, rate: float, achieved: float) -> dict[str, Any]:
    async with db.pool.acquire() as conn:
        row = await conn.fetchrow(_LATENCY_SQL)
    assert row is not None
    p50, p90, p99 = row["commit_pct"]
    begin_p50, begin_p99 = row["begin_pct"]
    claimed_p50, claimed_p99 = row["claimed_pct"]
    return {
        "target_events_per_s": rate,
        "achieved_events_per_s": round(achieved),
        "events": row["events"],
        "p50_ms": round(p50, 2),
        "p90_ms": round(p90, 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(float(row["commit_max"]), 2),
        "from_transaction_start_p50_ms": round(begin_p50, 2),
        "from_transaction_start_p99_ms": round(begin_p99, 2),
        "relay_claimed_p50_ms": round(claimed_p50, 2),
        "relay_claimed_p99_ms": round(claimed_p99, 2),
        "measured": "from the producer's COMMIT returning (its wall clock) to the consumer "
        "handler (its wall clock: the same machine clock); producer, relay and consumer in "
        "processes of their own. 'from_transaction_start' adds the producer's own commit wait. "
        "'relay_claimed' is from the COMMIT to the start of the relay transaction that "
        "published the row (published_at is that transaction's now()).",
    }


class _Elected:
    """A fixed term (token 1): the relay runs its production path, fence included."""

    async def run_while_leader(self, work: Callable[[Any], Awaitable[None]]) -> None:
        await SoleLeader().run_while_leader(lambda term: work(_Term(term.lost)))


class _Term:
    def __init__(self, lost: asyncio.Event) -> None:
        self.token = 1
        self.lost = lost


@asynccontextmanager
async def _child(code: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _expect(process: asyncio.subprocess.Process, word: str) -> str:
    """The first line of the child's output starting with ``word``."""
    assert process.stdout is not None
    async with asyncio.timeout(120):
        while line := (await process.stdout.readline()).decode():
            if line.startswith(word):
                return line
    raise RuntimeError(f"child exited without saying {word!r}")


@asynccontextmanager
async def _running(coro: Awaitable[Any]) -> AsyncIterator[None]:
    task: asyncio.Future[Any] = asyncio.ensure_future(coro)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def scratch(batch: int) -> AsyncIterator[Bench]:
    """A scratch database and vhost, migrated and declared; removed afterwards."""
    name = f"ordermesh_bench_{uuid.uuid4().hex[:8]}"
    vhost = name.replace("_", "-")
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        dsn = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        async with Database(dsn, max_size=10) as db, Broker(AMQP + vhost, name="bench") as broker:
            await db.migrate(SHARED_MIGRATIONS)
            await asyncio.wait_for(broker.connected.wait(), 10)
            bench = Bench(db, broker, amqp_url=AMQP + vhost, batch=batch)
            await bench.prepare()
            yield bench
    finally:
        _rabbitmqctl("delete_vhost", vhost)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=30)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    async with scratch(args.batch) as bench:
        bench.aggregates = args.aggregates
        variants = await throughput(bench, events=args.events, runs=args.runs)
        lag = [
            await latency(bench, rate=rate, seconds=args.latency_seconds)
            for rate in args.latency_rates
        ]
    relay, broker, seed = (variants[k]["events_per_s_median"] for k in ("relay", "broker", "seed"))
    return {
        "benchmark": "outbox relay throughput and commit->consumer latency",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "events_per_run": args.events,
        "runs": args.runs,
        "relay_batch_size": args.batch,
        "aggregates": args.aggregates,
        "throughput": variants,
        "relay_vs_broker": round(relay / broker, 2),
        "relay_vs_seed": round(relay / seed, 2),
        "latency": lag,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "notes": "Everything shares a 2-core machine (Postgres, RabbitMQ, this process): "
        "compare ratios within one run. Messages go to one durable quorum queue. 'broker' "
        "publishes pre-encoded messages (no database, no encoding) and is the ceiling.",
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000, help="events per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant (median kept)")
    parser.add_argument("--batch", type=int, default=500, help="relay batch / publish window")
    parser.add_argument(
        "--aggregates", type=int, default=1000, help="events spread over this many aggregates"
    )
    parser.add_argument(
        "--latency-rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default=[200.0, 500.0, 1000.0],
        help="steady producer rates, events/s (default: 200,500,1000)",
    )
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    return parser.parse_args()


if __name__ == "__main__":
    results = asyncio.run(main(parse_args()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
