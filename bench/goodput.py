"""Goodput at 2x saturation, load shedding on and off (issue 15, item 5).

Two local stacks run side by side, the same but for ``MAX_IN_FLIGHT_SAGAS``: the default
(shedding on) and 100,000 (off: every order is admitted, as before shedding existed). Each
run, alternating which stack goes first:

1. saturation: each stack's closed-loop throughput (``bench/saga.py``'s 32 clients); the
   overload rate is 2x the mean of the two.
2. overload: happy orders arrive open loop at that rate for ``WINDOW`` s. Goodput is the
   orders that reached ``completed`` inside the window (``orders.updated_at`` on the server)
   per second; also how many were shed (429), cancelled or still pending when the window
   closed, and the p99 answer time of the orders admitted (``ORDER_WAIT=20``: answered when
   the saga ended). The backlog (outbox rows pending, queued messages: bench/backlog.py)
   is taken at the window's start and end; a window whose backlog grew flags the figures.
3. drain: wait until no order is pending (the backlog of the stack without shedding runs
   into its deadlines and compensations), then top up stock and money.

A last check runs the shedding stack open loop at a sustainable rate (``SUSTAINABLE`` x
saturation): nothing may be shed there; the most sagas seen in flight says how far below the
bound normal load stays.

    uv run python -m bench.run --only goodput
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from bench.backlog import BacklogProbe, window_growth
from bench.bare_saga import connect
from bench.saga import (
    TOP_UP_MONEY,
    TOP_UP_UNITS,
    Figure,
    LocalStack,
    Target,
    backlog_flags,
    closed_loop,
    happy_orders,
    local_stack,
)

ON_PORT_OFFSET = 28000  # ports 36000-36003
OFF_PORT_OFFSET = 28100  # ports 36100-36103
UNBOUNDED = 100_000
# Answered when the saga ended (no 202 before 20 s); the bound is the default (shedding on).
STACK_ENV = {"ORDER_WAIT": "20"}
OVERLOAD = 2.0
SUSTAINABLE = 0.6
# Long enough for the unbounded backlog to outgrow SAGA_DEADLINE (10 s): at 2x saturation it
# grows by one saturation's worth of sagas per second, all sharing the CPU.
WINDOW = 25.0
SUSTAINABLE_WINDOW = 10.0
DRAIN_WITHIN = 180.0
SAMPLE_EVERY = 0.1


@dataclass
class OverloadRun:
    """What one open-loop run saw on one stack."""

    rate: float
    window: float
    answers: Counter[str] = field(default_factory=Counter)
    admitted_latencies: list[float] = field(default_factory=list)
    completed_in_window: int = 0
    final: dict[str, int] = field(default_factory=dict)
    most_in_flight: int = 0
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    backlog: dict[str, Any] | None = None  # window_growth() of the window

    @property
    def goodput(self) -> float:
        """Orders that reached ``completed`` inside the window, per second."""
        return self.completed_in_window / self.window

    @property
    def shed(self) -> int:
        """Orders answered 429."""
        return self.answers["HTTP 429"]

    @property
    def p99_ms(self) -> float:
        """p99 answer time of the orders admitted (0 when none was)."""
        ordered = sorted(self.admitted_latencies)
        if not ordered:
            return 0.0
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"goodput {self.goodput:6.1f} orders/s, shed {self.shed}, p99 admitted"
            f" {self.p99_ms:6.0f} ms, most in flight {self.most_in_flight},"
            f" answers {dict(self.answers)}, final {self.final}"
        )


# -- the load --------------------------------------------------------------------------------


async def open_loop(
    stack: LocalStack, *, rate: float, window: float, probe: BacklogProbe | None = None
) -> OverloadRun:
    """Happy orders at ``rate``/s for ``window`` s (arrival times fixed in advance: lateness
    does not thin the load); waits for every answer, then counts from the database. With a
    ``probe``, the backlog at the window's start and end too."""
    start = await probe.snapshot() if probe else None
    run = OverloadRun(rate, window)
    url = stack.url("order-1")
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        asyncio.TaskGroup() as outer,
    ):
        sampler = outer.create_task(most_pending(stack, run))
        orders = happy_orders()
        async with asyncio.TaskGroup() as tg:
            begin = time.monotonic()
            for n in range(int(rate * window)):
                await asyncio.sleep(max(0.0, begin + n / rate - time.monotonic()))
                tg.create_task(_place(session, url, next(orders), run))
            if probe is not None and start is not None:
                await asyncio.sleep(max(0.0, begin + window - time.monotonic()))
                run.backlog = window_growth(start, await probe.snapshot())
        sampler.cancel()
    ended = run.started + timedelta(seconds=window)
    run.completed_in_window = await completed_between(stack, run.started, ended)
    return run


async def _place(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], run: OverloadRun
) -> None:
    sent = time.monotonic()
    try:
        async with session.post(f"{url}/orders", json=body) as answer:
            order = await answer.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        run.answers[type(exc).__name__] += 1
        return
    if answer.status == 429:
        run.answers["HTTP 429"] += 1
        return
    run.admitted_latencies.append(time.monotonic() - sent)
    found = order.get("status") if isinstance(order, dict) else None
    run.answers[str(found) if answer.status < 300 and found else f"HTTP {answer.status}"] += 1


async def most_pending(stack: LocalStack, run: OverloadRun) -> None:
    """Keep ``run.most_in_flight``: the most orders pending at once (a pending order is a saga
    in flight), sampled every SAMPLE_EVERY s until cancelled."""
    conn = await connect(stack.database_url("order"))
    try:
        while True:
            run.most_in_flight = max(run.most_in_flight, await pending(conn))
            await asyncio.sleep(SAMPLE_EVERY)
    finally:
        await conn.close()


async def pending(conn: Any) -> int:
    """Orders whose saga has not ended."""
    count: int = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'pending'")
    return count


async def completed_between(stack: LocalStack, started: datetime, ended: datetime) -> int:
    """Orders that reached ``completed`` in [started, ended) (the server's clock: one machine)."""
    conn = await connect(stack.database_url("order"))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE status = 'completed'"
            " AND updated_at >= $1 AND updated_at < $2",
            started,
            ended,
        )
        return count
    finally:
        await conn.close()


async def drain(stack: LocalStack, run: OverloadRun | None = None) -> None:
    """Wait until no order is pending (bounded), record the final statuses of the run's
    orders, top up stock and money."""
    conn = await connect(stack.database_url("order"))
    try:
        deadline = time.monotonic() + DRAIN_WITHIN
        # The backlog runs into its deadlines and compensations in other processes.
        while await pending(conn) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        if run is not None:
            rows = await conn.fetch(
                "SELECT status, count(*) AS n FROM orders WHERE created_at >= $1 GROUP BY status",
                run.started,
            )
            run.final = {r["status"]: r["n"] for r in rows}
    finally:
        await conn.close()
    await stack.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)


# -- the runs --------------------------------------------------------------------------------


@dataclass
class Runs:
    """Every run of both stacks."""

    saturation: list[float] = field(default_factory=list)
    on: list[OverloadRun] = field(default_factory=list)
    off: list[OverloadRun] = field(default_factory=list)
    sustainable: list[OverloadRun] = field(default_factory=list)


async def saturation(stacks: list[LocalStack]) -> float:
    """The mean closed-loop throughput of ``stacks`` (32 clients: below the bound)."""
    rates = []
    for stack in stacks:
        services = [pid for p, pid in stack.pids().items() if p != "etcd"]
        result = await closed_loop(stack.url("order-1"), services, warmup=2, duration=5)
        rates.append(result.rate)
        await drain(stack)
    print(f"  saturation (closed loop): {[round(r, 1) for r in rates]} orders/s", flush=True)
    return statistics.mean(rates)


def alternating(run: int, on: LocalStack, off: LocalStack) -> Iterator[tuple[str, LocalStack]]:
    """Both stacks, the one going first alternating run by run."""
    pair = [("on", on), ("off", off)]
    yield from pair if run % 2 == 0 else reversed(pair)


async def measure_runs(
    on: LocalStack,
    off: LocalStack,
    *,
    runs: int,
    window: float,
    probes: dict[str, BacklogProbe] | None = None,
) -> Runs:
    """``runs`` overload runs of each stack, then the sustainable check; ``probes`` (by
    label) watch each window's backlog."""
    probes = probes or {}
    seen = Runs()
    for run in range(runs):
        stacks = [stack for _, stack in alternating(run, on, off)]
        rate = OVERLOAD * await saturation(stacks)
        seen.saturation.append(rate / OVERLOAD)
        for label, stack in alternating(run, on, off):
            result = await open_loop(stack, rate=rate, window=window, probe=probes.get(label))
            await drain(stack, result)
            getattr(seen, label).append(result)
            print(f"  run {run + 1} shedding {label:<3} at {rate:.0f}/s: {result.summary()}",
                  flush=True)  # fmt: skip
    rate = SUSTAINABLE * statistics.median(seen.saturation)
    for _ in range(runs):
        result = await open_loop(
            on, rate=rate, window=min(window, SUSTAINABLE_WINDOW), probe=probes.get("on")
        )
        await drain(on, result)
        seen.sustainable.append(result)
        print(f"  sustainable {rate:.0f}/s, shedding on: {result.summary()}", flush=True)
    return seen


def figures(seen: Runs, *, bound: int, window: float) -> list[Figure]:
    """The goodput figures: shedding on against off, and the sustainable check."""
    note = (
        f"open loop at {OVERLOAD:g}x the closed-loop saturation, happy orders, {window:g} s;"
        f" shedding on: MAX_IN_FLIGHT_SAGAS={bound}, off: {UNBOUNDED:,}"
    )
    detail = {
        "saturation_orders_per_s": [round(s, 1) for s in seen.saturation],
        "shed_429": _both(seen, lambda r: r.shed),
        "answers": _both(seen, lambda r: dict(r.answers)),
        "final_statuses": _both(seen, lambda r: r.final),
        "most_in_flight": _both(seen, lambda r: r.most_in_flight),
        "backlog": _both(seen, lambda r: r.backlog),
    }
    flags = _overload_flags(seen)
    return [
        Figure(
            f"goodput at {OVERLOAD:g}x saturation, shedding on",
            "orders/s",
            [r.goodput for r in seen.on],
            [r.goodput for r in seen.off],
            "shedding off",
            Target("ratio", ">=", 1.0, ">= 1x shedding off"),
            note=note,
            detail=detail,
            flags=flags,
        ),
        Figure(
            f"goodput at {OVERLOAD:g}x saturation / saturation, shedding on",
            "share",
            [r.goodput / s for r, s in zip(seen.on, seen.saturation, strict=True)],
            [r.goodput / s for r, s in zip(seen.off, seen.saturation, strict=True)],
            "shedding off",
            note="goodput over the same run's closed-loop throughput",
            flags=list(flags),
        ),
        Figure(
            f"p99 of admitted orders at {OVERLOAD:g}x saturation, shedding on",
            "ms",
            [r.p99_ms for r in seen.on],
            [r.p99_ms for r in seen.off],
            "shedding off",
            note="answer time of every order not shed (ORDER_WAIT=20: when its saga ended)",
        ),
        _sustainable_figure(seen, bound=bound),
    ]


def _overload_flags(seen: Runs) -> list[str]:
    """The flags of both stacks' overload windows, each saying which stack it was."""
    return [
        f"shedding {label}: {flag}"
        for label in ("on", "off")
        for flag in backlog_flags([r.backlog for r in getattr(seen, label) if r.backlog])
    ]


def _both(seen: Runs, show: Callable[[OverloadRun], object]) -> dict[str, list[object]]:
    return {"on": [show(r) for r in seen.on], "off": [show(r) for r in seen.off]}


def _sustainable_figure(seen: Runs, *, bound: int) -> Figure:
    return Figure(
        f"most sagas in flight at {SUSTAINABLE:g}x saturation, shedding on",
        "sagas",
        [float(r.most_in_flight) for r in seen.sustainable],
        target=Target("value", "<", bound, f"< {bound} (the bound: nothing shed)"),
        note="pending orders, sampled every 100 ms, open loop",
        flags=backlog_flags([r.backlog for r in seen.sustainable if r.backlog]),
        detail={
            "backlog": [r.backlog for r in seen.sustainable],
            "shed_429": [r.shed for r in seen.sustainable],
            "goodput": [round(r.goodput, 1) for r in seen.sustainable],
            "p99_ms": [round(r.p99_ms) for r in seen.sustainable],
        },
    )


async def measure(*, smoke: bool = False) -> list[Figure]:
    """The goodput figures (``smoke``: one short run)."""
    from order.app import OrderSettings

    bound = OrderSettings.model_fields["max_in_flight_sagas"].default
    window = 5.0 if smoke else WINDOW
    off_env = {**STACK_ENV, "MAX_IN_FLIGHT_SAGAS": str(UNBOUNDED)}
    async with (
        local_stack(port_offset=ON_PORT_OFFSET, env=STACK_ENV) as on,
        local_stack(port_offset=OFF_PORT_OFFSET, env=off_env) as off,
        await BacklogProbe.of(on) as on_probe,
        await BacklogProbe.of(off) as off_probe,
    ):
        probes = {"on": on_probe, "off": off_probe}
        seen = await measure_runs(on, off, runs=1 if smoke else 3, window=window, probes=probes)
    return figures(seen, bound=bound, window=window)
