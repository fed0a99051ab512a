"""The timeline consumer inline (in the order process, the default) against a process of its
own (``ordermesh-local up --timeline-worker``): two stacks side by side, closed-loop
throughput and CPU alternating which goes first, then p99 at 100 orders/s, open loop.

The question (issue 18, item 2): does leaving the saga's event loop to the saga win, on a
machine whose two cores also run Postgres, RabbitMQ and the other services?

    uv run python -m bench.run --only timeline_worker
"""

from __future__ import annotations

from bench.backlog import BacklogProbe
from bench.saga import (
    STACK_ENV,
    TOP_UP_MONEY,
    TOP_UP_UNITS,
    Figure,
    LatencySamples,
    LocalStack,
    LoopResult,
    backlog_flags,
    closed_loop,
    local_stack,
    open_loop,
)

INLINE_PORT_OFFSET = 29000  # ports 37000-37003
WORKER_PORT_OFFSET = 29100  # ports 37100-37103
RATE = 100


async def measure(*, smoke: bool = False) -> list[Figure]:
    """Throughput, CPU per order and p99 at 100/s, worker against inline."""
    runs = 1 if smoke else 3
    async with (
        local_stack(port_offset=INLINE_PORT_OFFSET, env=STACK_ENV) as inline,
        local_stack(
            port_offset=WORKER_PORT_OFFSET, env=STACK_ENV, options=["--timeline-worker"]
        ) as worker,
        await BacklogProbe.of(inline) as inline_probe,
        await BacklogProbe.of(worker) as worker_probe,
    ):
        stacks = {"inline": (inline, inline_probe), "worker": (worker, worker_probe)}
        loops: dict[str, list[LoopResult]] = {"inline": [], "worker": []}
        latency = {"inline": LatencySamples(), "worker": LatencySamples()}
        for run in range(runs):
            order = ["inline", "worker"] if run % 2 == 0 else ["worker", "inline"]
            for name in order:
                stack, probe = stacks[name]
                await stack.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
                result = await closed_loop(
                    stack.url("order-1"),
                    _service_pids(stack),
                    warmup=1 if smoke else 2,
                    duration=2 if smoke else 6,
                    probe=probe,
                )
                loops[name].append(result)
                print(f"  run {run + 1} {name}: {result.rate:.1f} orders/s", flush=True)
            for name in order:
                stack, probe = stacks[name]
                await stack.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
                await open_loop(
                    stack.url("order-1"),
                    rate=RATE,
                    duration=2 if smoke else 5,
                    into=latency[name],
                    probe=probe,
                )
    return _figures(loops, latency)


def _service_pids(stack: LocalStack) -> list[int]:
    return [pid for program, pid in stack.pids().items() if program != "etcd"]


def _figures(
    loops: dict[str, list[LoopResult]], latency: dict[str, LatencySamples]
) -> list[Figure]:
    worker, inline = loops["worker"], loops["inline"]
    baseline = "timeline inline"
    return [
        Figure(
            "saga throughput, timeline in its own process",
            "orders/s",
            [r.rate for r in worker],
            [r.rate for r in inline],
            baseline,
            note="closed loop, 32 clients; the worker's stack has one process more",
            flags=backlog_flags([r.backlog for r in worker if r.backlog is not None]),
        ),
        Figure(
            "saga CPU per order, timeline in its own process",
            "CPU-ms",
            [r.cpu_ms_per_order for r in worker],
            [r.cpu_ms_per_order for r in inline],
            baseline,
            note="user+system CPU of the service processes (the worker's included)",
        ),
        Figure(
            f"saga latency p99 at {RATE}/s, timeline in its own process",
            "ms",
            latency["worker"].p99,
            latency["inline"].p99,
            baseline,
            note=f"open loop; {latency['worker'].errors} / {latency['inline'].errors} errors",
            flags=backlog_flags(latency["worker"].backlog),
        ),
    ]
