"""Tracing's cost per order: the platform with tracing on (every span exported over
OTLP/HTTP to a sink that answers 200 and keeps nothing) against tracing off, two stacks side
by side, closed-loop throughput and CPU per order alternating which goes first.

Off is the default and installs nothing (bench/tracing_overhead.py: an instrumentation
installed but switched off costs far more than noise, so none is installed).

    uv run python -m bench.run --only tracing
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from bench.saga import (
    STACK_ENV,
    TOP_UP_MONEY,
    TOP_UP_UNITS,
    Figure,
    LoopResult,
    closed_loop,
    local_stack,
)

OFF_PORT_OFFSET = 29200  # ports 37200-37203
ON_PORT_OFFSET = 29300  # ports 37300-37303


@asynccontextmanager
async def otlp_sink() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """An OTLP/HTTP endpoint that takes every export (its URL, and bytes and requests seen)."""
    seen = {"requests": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        seen["requests"] += 1
        seen["bytes"] += len(await request.read())
        return web.Response(status=200, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def measure(*, smoke: bool = False) -> list[Figure]:
    """Throughput and CPU per order, tracing on against off."""
    runs = 1 if smoke else 3
    async with otlp_sink() as (sink, seen):
        on_env = STACK_ENV | {"OTEL_EXPORTER_OTLP_ENDPOINT": sink}
        async with (
            local_stack(port_offset=OFF_PORT_OFFSET, env=STACK_ENV) as off,
            local_stack(port_offset=ON_PORT_OFFSET, env=on_env) as on,
        ):
            loops: dict[str, list[LoopResult]] = {"off": [], "on": []}
            for run in range(runs):
                for name in ("off", "on") if run % 2 == 0 else ("on", "off"):
                    stack = off if name == "off" else on
                    await stack.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
                    pids = [pid for p, pid in stack.pids().items() if p != "etcd"]
                    result = await closed_loop(
                        stack.url("order-1"),
                        pids,
                        warmup=1 if smoke else 2,
                        duration=2 if smoke else 6,
                    )
                    loops[name].append(result)
                    print(f"  run {run + 1} tracing {name}: {result.rate:.1f} orders/s", flush=True)
    note = f"spans exported to a local OTLP sink ({seen['requests']} exports, {seen['bytes']} B)"
    return [
        Figure(
            "saga CPU per order, tracing on",
            "CPU-ms",
            [r.cpu_ms_per_order for r in loops["on"]],
            [r.cpu_ms_per_order for r in loops["off"]],
            "tracing off",
            note=note,
        ),
        Figure(
            "saga throughput, tracing on",
            "orders/s",
            [r.rate for r in loops["on"]],
            [r.rate for r in loops["off"]],
            "tracing off",
            note="closed loop, 32 clients",
        ),
    ]
