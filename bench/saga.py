"""Saga figures: closed-loop throughput and open-loop latency, against the bare saga.

Both systems run at the same time on the same machine: the real platform as a local stack
(``ordermesh-local up`` on fresh databases) and the bare saga (``bench/bare_saga.py``).
Measurements alternate between them run by run, so a noisy neighbour hurts both alike.

* throughput: ``CONCURRENCY`` clients each post an order and wait for its answer, over and
  over; orders answered ``completed`` inside the measured window, per second. Every order is a
  happy one (stock and money are topped up before each run), so every hop runs.
* latency: orders arrive at a fixed rate (``ordermesh_deploy.load.run_load``, open loop, its
  seeded mix of customers, products and destinations); p50 and p99 of the answer time.

The bare saga makes the platform's four hops over the platform's pool settings; each of the
platform's windows records its backlog at its start and end (``bench/backlog.py``), and a
window whose backlog grew flags its figures.

This module also holds what the other bench modules share: :class:`Figure` (one line of
the results table) and :func:`local_stack` (a stack of our own, always stopped, its
databases and RabbitMQ vhost removed).

    uv run python -m bench.run --only saga
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import aio_pika
import aiohttp
from ordermesh_deploy.load import run_load
from ordermesh_deploy.local import SERVICES, Stack
from pamqp.common import FieldTable
from supervisor.xmlrpc import SupervisorTransport

from bench.backlog import Backlog, BacklogProbe, window_growth
from bench.bare_saga import BareSaga, bare_saga, connect

POSTGRES_URL = os.environ.get("POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432"
RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
SAGA_PORT_OFFSET = 26000  # away from make dev (0) and the e2e/chaos tests (22000, 23000)
CONCURRENCY = 32
LATENCY_RATES = (25, 50, 100)
TOP_UP_UNITS = 20_000
TOP_UP_MONEY = Decimal(5_000_000)
TIMELINE_QUEUE = "order.timeline"
EVENTS_EXCHANGE = "ordermesh.events"
SINK_LENGTH = 1000
# The stack answers POST /orders only when the saga ended (no 202): latency is the saga's.
# Load shedding off: at 100/s (past saturation) its fast 429s would mix into the percentiles,
# which measure every order's saga; bench/goodput.py measures shedding.
STACK_ENV = {"ORDER_WAIT": "20", "MAX_IN_FLIGHT_SAGAS": "100000"}


# -- figures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A figure's target: ``on`` (the value or the ratio to the baseline) ``op`` ``limit``."""

    on: Literal["value", "ratio"]
    op: Literal[">=", "<=", "<"]
    limit: float
    text: str

    def met(self, value: float, ratio: float | None) -> bool | None:
        """Whether the median meets it (None when there is no ratio to judge)."""
        seen = value if self.on == "value" else ratio
        if seen is None:
            return None
        if self.op == ">=":
            return seen >= self.limit
        return seen <= self.limit if self.op == "<=" else seen < self.limit


@dataclass
class Figure:
    """One line of the results table: runs of a figure, and of its baseline if it has one.

    A figure with no runs was not measured (``not_measured`` says why): it is reported, not
    fatal. ``flags`` lists what makes its runs suspect, e.g. a window whose backlog grew.
    """

    name: str
    unit: str
    runs: list[float]
    baseline_runs: list[float] = field(default_factory=list)
    baseline_name: str = ""
    target: Target | None = None
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    not_measured: str = ""

    @property
    def measured(self) -> bool:
        """Whether it has runs at all."""
        return bool(self.runs)

    @property
    def value(self) -> float | None:
        """The median of the runs (None when not measured)."""
        return statistics.median(self.runs) if self.runs else None

    @property
    def baseline(self) -> float | None:
        """The median of the baseline's runs."""
        return statistics.median(self.baseline_runs) if self.baseline_runs else None

    @property
    def ratio(self) -> float | None:
        """value / baseline: the median of the per-run ratios when runs came in pairs
        (each pair shares its moment's noise), else the ratio of the medians."""
        baseline, value = self.baseline, self.value
        if not baseline or value is None:
            return None
        if len(self.runs) == len(self.baseline_runs):
            pairs = zip(self.runs, self.baseline_runs, strict=True)
            return statistics.median([a / b for a, b in pairs if b])
        return value / baseline

    def as_json(self) -> dict[str, Any]:
        """The figure as ``latest.json`` lists it."""
        ratio, value = self.ratio, self.value
        met = self.target.met(value, ratio) if self.target and value is not None else None
        return {
            "name": self.name,
            "measured": self.measured,
            "value": _round(value),
            "unit": self.unit,
            "baseline": _round(self.baseline),
            "baseline_name": self.baseline_name or None,
            "ratio": _round(ratio),
            "target": self.target.text if self.target else None,
            "met": met,
            "runs": [_round(r) for r in self.runs],
            "min": _round(min(self.runs)) if self.runs else None,
            "max": _round(max(self.runs)) if self.runs else None,
            "baseline_runs": [_round(r) for r in self.baseline_runs],
            "note": self.note or None,
            "flags": self.flags,
            **({"not_measured": self.not_measured} if self.not_measured else {}),
            **({"detail": self.detail} if self.detail else {}),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


# -- a local stack of our own ----------------------------------------------------------------


@dataclass
class LocalStack:
    """A started local stack: URLs, databases, and its supervisord for crashes."""

    run_dir: Path
    stack: Stack
    prefix: str

    def url(self, program: str) -> str:
        """Base URL of an instance, e.g. ``order-1``."""
        return self.stack.instances[program]

    def database_url(self, service: str) -> str:
        """DSN of a service's database."""
        return f"{self.stack.postgres_url.rstrip('/')}/{self.prefix}_{service}"

    def supervisor(self) -> Any:
        """An XML-RPC proxy to the stack's supervisord (its ``supervisor.*`` API)."""
        socket = Path(self.stack.run_dir).resolve() / "supervisor.sock"
        transport = SupervisorTransport(None, None, f"unix://{socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def pids(self) -> dict[str, int]:
        """Process id by program (0 for a program not running)."""
        return {p["name"]: p["pid"] for p in self.supervisor().getAllProcessInfo()}

    async def top_up(self, *, units: int, money: Decimal) -> None:
        """More stock on every product (``stocked`` too: the conservation CHECK) and more
        money for every customer, so long runs never meet a business "no"."""
        await _execute(
            self.database_url("inventory"),
            "UPDATE products SET stocked = stocked + $1, available = available + $1",
            units,
        )
        await _execute(
            self.database_url("payment"), "UPDATE customers SET balance = balance + $1", money
        )


async def _execute(dsn: str, sql: str, *args: Any) -> None:
    conn = await connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


@asynccontextmanager
async def local_stack(
    *,
    port_offset: int,
    scale: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
    options: Sequence[str] = (),
) -> AsyncIterator[LocalStack]:
    """``ordermesh-local up`` (with ``options``) on fresh databases and a private RabbitMQ
    vhost; on exit ``down``, drop the databases and the vhost, remove the run directory."""
    run_dir = Path(tempfile.mkdtemp(prefix="ordermesh-bench-")) / "run"
    prefix = f"om_bench_{uuid.uuid4().hex[:8]}"
    scaled = [f"--scale={s}={n}" for s, n in (scale or {}).items()]
    try:
        async with private_vhost(prefix.replace("_", "-")) as amqp_url:
            code, output = await _local(
                run_dir,
                "up",
                f"--port-offset={port_offset}",
                f"--db-prefix={prefix}",
                f"--postgres-url={POSTGRES_URL}",
                f"--rabbitmq-url={amqp_url}",
                "--timeout=90",
                *scaled,
                *options,
                env=env,
            )
            try:
                stack = Stack.load(run_dir)
                if code != 0 or stack is None:
                    raise RuntimeError(f"the local stack did not start:\n{output[-3000:]}")
                await ensure_events_routable(amqp_url)
                yield LocalStack(run_dir, stack, prefix)
            finally:
                await _local(run_dir, "down")
    finally:
        try:
            await drop_databases(prefix)
        finally:
            shutil.rmtree(run_dir.parent, ignore_errors=True)


@asynccontextmanager
async def private_vhost(name: str) -> AsyncIterator[str]:
    """A RabbitMQ vhost of our own (its AMQP URL), deleted afterwards: the stack's durable
    queues must not outlive it in the shared vhost, where another stack would consume them."""
    if shutil.which("rabbitmqctl") is None:
        print("  rabbitmqctl not found: the stack shares the default vhost", flush=True)
        yield RABBITMQ_URL
        return
    await _rabbitmqctl("add_vhost", name)
    try:
        await _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield RABBITMQ_URL.rstrip("/") + "/" + name
    finally:
        await _rabbitmqctl("delete_vhost", name)


async def ensure_events_routable(amqp_url: str) -> None:
    """Give events somewhere to go when no consumer has bound a queue in the fresh vhost.

    In a deployment the order timeline's queue (bound to ``#``) exists before most events
    are published; in a fresh vhost without it, every event comes back unroutable and the
    relays retry it, a cost no deployment pays for long. A short, non-durable sink (the
    broker drops its oldest message beyond SINK_LENGTH) stands in for that queue.
    """
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        try:
            await (await connection.channel()).declare_queue(TIMELINE_QUEUE, passive=True)
            return
        except aio_pika.exceptions.ChannelNotFoundEntity:
            pass
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        arguments: FieldTable = {"x-max-length": SINK_LENGTH, "x-overflow": "drop-head"}
        queue = await channel.declare_queue("bench.sink", arguments=arguments)
        await queue.bind(exchange, "#")


async def _rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {output.decode(errors='replace')}")


async def _local(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordermesh_deploy.local",
        f"--run-dir={run_dir}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")


async def drop_databases(prefix: str) -> None:
    """Drop ``<prefix>_<service>`` for every service (those that exist)."""
    conn = await connect(f"{POSTGRES_URL.rstrip('/')}/postgres")
    try:
        for service in SERVICES:
            await conn.execute(f'DROP DATABASE IF EXISTS "{prefix}_{service}" WITH (FORCE)')
    finally:
        await conn.close()


# -- CPU accounting --------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICK


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / _TICK


# -- throughput (closed loop) ----------------------------------------------------------------


def happy_orders() -> Iterator[dict[str, Any]]:
    """Orders that every participant accepts (given the top-ups), varied so that no single
    product or customer row takes every lock."""
    customers = itertools.cycle(("alice", "bob"))
    skus = itertools.cycle(("CB-404", "MS-202", "KB-101"))
    destinations = itertools.cycle(("DE", "FR", "NL"))
    while True:
        sku = next(skus)
        yield {
            "customer_id": next(customers),
            "items": [{"sku": sku, "quantity": 1}],
            "destination": next(destinations),
        }


@dataclass
class LoopResult:
    """What one closed-loop run saw."""

    rate: float
    completed: int
    statuses: dict[str, int]
    cpu_ms_per_order: float
    machine_cpu_ms_per_order: float
    backlog: dict[str, Any] | None = None  # window_growth(), when a probe watched the window


async def post_order(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    """Place one order; its status, or what went wrong instead."""
    try:
        async with session.post(f"{url}/orders", json=body) as answer:
            order = await answer.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        await asyncio.sleep(0.05)  # a down server must not turn the client into a busy loop
        return type(exc).__name__
    found = order.get("status") if isinstance(order, dict) else None
    return str(found) if answer.status < 300 and found else f"HTTP {answer.status}"


async def closed_loop(
    url: str,
    pids: Sequence[int],
    *,
    warmup: float,
    duration: float,
    probe: BacklogProbe | None = None,
) -> LoopResult:
    """Orders/s completed inside the window after ``warmup``, with CONCURRENCY clients (an
    order answered otherwise is counted in ``statuses`` only: failing fast is not throughput).
    With a ``probe``, the backlog at the window's start and end too."""
    orders = happy_orders()
    statuses: dict[str, int] = {}
    clock: dict[str, float] = {}
    edges: list[Backlog] = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        window = (start + warmup, start + warmup + duration)

        async def client() -> None:
            while time.monotonic() < window[1]:
                status = await post_order(session, url, next(orders))
                if window[0] <= time.monotonic() < window[1]:
                    statuses[status] = statuses.get(status, 0) + 1

        async def meter() -> None:
            await asyncio.sleep(warmup)
            if probe is not None:  # before the CPU clock starts: its queries are not the saga's
                edges.append(await probe.snapshot())
            clock.update(cpu=process_cpu(pids), machine=machine_cpu())
            await asyncio.sleep(duration)
            clock.update(
                cpu=process_cpu(pids) - clock["cpu"], machine=machine_cpu() - clock["machine"]
            )
            if probe is not None:
                edges.append(await probe.snapshot())

        await asyncio.gather(meter(), *(client() for _ in range(CONCURRENCY)))
    completed = statuses.get("completed", 0)
    per_order = 1000 / max(1, completed)
    return LoopResult(
        completed / duration,
        completed,
        statuses,
        clock["cpu"] * per_order,
        clock["machine"] * per_order,
        window_growth(*edges) if edges else None,
    )


async def measure_throughput(
    stack: LocalStack,
    bare: BareSaga,
    *,
    runs: int,
    warmup: float,
    duration: float,
    probe: BacklogProbe,
) -> list[Figure]:
    """Closed-loop orders/s, the platform against the bare saga, alternating which goes first;
    the platform's backlog at each window's edges (the bare saga defers nothing)."""
    real: list[LoopResult] = []
    base: list[LoopResult] = []
    for run in range(runs):
        await stack.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
        await bare.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
        services = [pid for p, pid in stack.pids().items() if p != "etcd"]
        pair = [
            ("platform", stack.url("order-1"), services, real, probe),
            ("bare saga", bare.url, list(bare.pids.values()), base, None),
        ]
        for label, url, pids, into, watch in pair if run % 2 == 0 else reversed(pair):
            result = await closed_loop(url, pids, warmup=warmup, duration=duration, probe=watch)
            into.append(result)
            _show_loop(run, label, result)
    note = f"{CONCURRENCY} clients, happy orders; {duration:g} s window after {warmup:g} s"
    figures = _throughput_figures(real, base, note)
    windows = [r.backlog for r in real if r.backlog is not None]
    for figure in figures:
        figure.flags += backlog_flags(windows)
        figure.detail["backlog"] = windows
    return figures


def backlog_flags(windows: Sequence[dict[str, Any]]) -> list[str]:
    """A flag for each window whose backlog grew (its figure may be flattered)."""
    return [
        f"run {n}: backlog grew by {w['growth']} during the window (outbox rows + queued"
        " messages): deferred work, the figure may be flattered"
        for n, w in enumerate(windows, 1)
        if w["grew"]
    ]


def _show_loop(run: int, label: str, result: LoopResult) -> None:
    grew = f"  backlog {result.backlog['growth']:+d}" if result.backlog else ""
    print(
        f"  throughput run {run + 1} {label:<9} {result.rate:7.1f} orders/s"
        f"  {result.cpu_ms_per_order:5.2f} CPU-ms/order (services)"
        f"  {result.machine_cpu_ms_per_order:5.2f} (machine)  {result.statuses}{grew}",
        flush=True,
    )


def _throughput_figures(real: list[LoopResult], base: list[LoopResult], note: str) -> list[Figure]:
    return [
        Figure(
            "saga throughput (closed loop)",
            "orders/s",
            [r.rate for r in real],
            [r.rate for r in base],
            "bare saga",
            Target("ratio", ">=", 0.35, ">= 0.35x four-hop bare saga (moonshot 0.5x)"),
            note=note,
        ),
        Figure(
            "saga CPU per order (service processes)",
            "CPU-ms",
            [r.cpu_ms_per_order for r in real],
            [r.cpu_ms_per_order for r in base],
            "bare saga",
            note="user+system CPU of the four service processes during the throughput window",
        ),
        Figure(
            "saga CPU per order (whole machine)",
            "CPU-ms",
            [r.machine_cpu_ms_per_order for r in real],
            [r.machine_cpu_ms_per_order for r in base],
            "bare saga",
            note="includes Postgres, RabbitMQ, etcd, the load driver and any neighbour",
        ),
    ]


# -- latency (open loop) ---------------------------------------------------------------------


@dataclass
class LatencySamples:
    """p50 and p99 of each run, at one rate, for one system."""

    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    errors: int = 0
    backlog: list[dict[str, Any]] = field(default_factory=list)  # window_growth() per run


async def open_loop(
    url: str,
    *,
    rate: float,
    duration: float,
    into: LatencySamples,
    probe: BacklogProbe | None = None,
) -> None:
    """One open-loop run; its percentiles (and with a ``probe``, its backlog) go into ``into``."""
    start = await probe.snapshot() if probe else None
    result = await run_load(url, rate=rate, duration=duration, seed=len(into.p50) + 1)
    if probe is not None and start is not None:
        into.backlog.append(window_growth(start, await probe.snapshot()))
    into.p50.append(result.percentile(50))
    into.p99.append(result.percentile(99))
    into.errors += sum(result.errors.values())


async def measure_latency(
    stack: LocalStack, bare: BareSaga, *, runs: int, duration: float, probe: BacklogProbe
) -> list[Figure]:
    """p50/p99 at each rate in LATENCY_RATES, the platform against the bare saga."""
    real = {rate: LatencySamples() for rate in LATENCY_RATES}
    base = {rate: LatencySamples() for rate in LATENCY_RATES}
    for run in range(runs):
        for rate in LATENCY_RATES:
            await stack.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
            await bare.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
            pair = [(stack.url("order-1"), real[rate], probe), (bare.url, base[rate], None)]
            for url, into, watch in pair if run % 2 == 0 else reversed(pair):
                await open_loop(url, rate=rate, duration=duration, into=into, probe=watch)
            print(
                f"  latency run {run + 1} at {rate}/s: platform p50 {real[rate].p50[-1]:.1f}"
                f" p99 {real[rate].p99[-1]:.1f} ms; bare p50 {base[rate].p50[-1]:.1f}"
                f" p99 {base[rate].p99[-1]:.1f} ms",
                flush=True,
            )
    return [
        f
        for rate in LATENCY_RATES
        for f in _latency_figures(rate, real[rate], base[rate], duration)
    ]


def _latency_figures(
    rate: int, real: LatencySamples, base: LatencySamples, duration: float
) -> list[Figure]:
    note = f"open loop, ordermesh-load mix, {duration:g} s per run; {real.errors} errors"
    p99_target = Target("value", "<=", 100, "<= 100 ms") if rate == 100 else None
    return [
        Figure(
            f"saga latency p50 at {rate}/s",
            "ms",
            real.p50,
            base.p50,
            "bare saga",
            note=note,
            detail={"backlog": real.backlog},
            flags=backlog_flags(real.backlog),
        ),
        Figure(
            f"saga latency p99 at {rate}/s",
            "ms",
            real.p99,
            base.p99,
            "bare saga",
            p99_target,
            note=note,
            detail={"backlog": real.backlog},
            flags=backlog_flags(real.backlog),
        ),
    ]


# -- the group -------------------------------------------------------------------------------


async def measure(*, smoke: bool = False) -> list[Figure]:
    """Every saga figure (``smoke``: one short run each)."""
    runs = 1 if smoke else 3
    async with (
        local_stack(port_offset=SAGA_PORT_OFFSET, env=STACK_ENV) as stack,
        bare_saga(POSTGRES_URL) as bare,
        await BacklogProbe.of(stack) as probe,
    ):
        figures = await measure_throughput(
            stack,
            bare,
            runs=runs,
            warmup=1 if smoke else 2,
            duration=2 if smoke else 6,
            probe=probe,
        )
        figures += await measure_latency(
            stack, bare, runs=runs, duration=2 if smoke else 5, probe=probe
        )
    return figures
