"""Client CPU per call: ServiceClient over each engine, against the raw engines themselves.

A small FastAPI endpoint runs under uvicorn (uvloop + httptools) in a child process; this
process makes the calls and measures only its own CPU time (``time.process_time``), so the
figure is what a caller pays per call. Each variant runs at each concurrency ``--runs``
times, interleaved so that a noisy neighbour hurts all variants alike; the median is kept.

    uv run python bench/client_cpu.py                 # table + bench/results/client_cpu.json
    uv run python bench/client_cpu.py --calls 5000 --runs 5 --loop asyncio

The target (issue 3): ServiceClient within 1.3x the CPU per call of raw aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.resilience import HttpxEngine, ServiceClient, StaticInstances
from ordermesh_shared.resilience.transport import Engine

RESULTS = Path(__file__).resolve().parent / "results" / "client_cpu.json"
TARGET_RATIO = 1.3
WARMUP_CALLS = 200

SERVER = """
import asyncio, sys
import uvicorn
from fastapi import FastAPI

app = FastAPI()

@app.get("/customers/{customer_id}")
async def customer(customer_id: str) -> dict[str, str]:
    return {"id": customer_id, "name": "Alice Martin", "balance": "100000.00"}

config = uvicorn.Config(app, host="127.0.0.1", port=0, loop="uvloop", http="httptools",
                        log_level="warning", access_log=False, lifespan="off")
server = uvicorn.Server(config)

async def main():
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    print("ready", server.servers[0].sockets[0].getsockname()[1], flush=True)
    await serving

asyncio.run(main())
"""

Call = Callable[[], Awaitable[None]]
Variant = Callable[[str], AbstractAsyncContextManager[Call]]
PATH = "/customers/alice"


@asynccontextmanager
async def raw_aiohttp(base_url: str) -> AsyncIterator[Call]:
    async with aiohttp.ClientSession() as session:

        async def call() -> None:
            async with session.get(base_url + PATH) as answer:
                await answer.read()

        yield call


@asynccontextmanager
async def raw_httpx(base_url: str) -> AsyncIterator[Call]:
    async with httpx.AsyncClient() as client:

        async def call() -> None:
            await client.get(base_url + PATH)

        yield call


@asynccontextmanager
async def raw_httpx_aiohttp(base_url: str) -> AsyncIterator[Call]:
    from httpx_aiohttp import HttpxAiohttpClient

    async with HttpxAiohttpClient() as client:

        async def call() -> None:
            await client.get(base_url + PATH)

        yield call


EngineFactory = Callable[[], AbstractAsyncContextManager[Engine | None]]


def service_client(engine: EngineFactory) -> Variant:
    @asynccontextmanager
    async def variant(base_url: str) -> AsyncIterator[Call]:
        port = int(base_url.rsplit(":", 1)[1])
        found = StaticInstances({"pay": [ServiceInstance("pay", "pay-1", "127.0.0.1", port)]})
        async with engine() as chosen, ServiceClient(found, engine=chosen) as clients:
            pay = clients.service("pay")

            async def call() -> None:
                await pay.get(PATH)

            yield call

    return variant


@asynccontextmanager
async def aiohttp_engine() -> AsyncIterator[Engine | None]:
    yield None  # ServiceClient's default


@asynccontextmanager
async def httpx_engine() -> AsyncIterator[Engine | None]:
    yield HttpxEngine()  # its own httpx.AsyncClient, closed with the ServiceClient


@asynccontextmanager
async def httpx_aiohttp_engine() -> AsyncIterator[Engine | None]:
    from httpx_aiohttp import HttpxAiohttpClient

    async with HttpxAiohttpClient() as client:
        yield HttpxEngine(client=client)


VARIANTS: dict[str, Variant] = {
    "raw aiohttp": raw_aiohttp,
    "raw httpx (default transport)": raw_httpx,
    "raw httpx + httpx-aiohttp": raw_httpx_aiohttp,
    "ServiceClient (aiohttp engine)": service_client(aiohttp_engine),
    "ServiceClient (httpx engine)": service_client(httpx_engine),
    "ServiceClient (httpx-aiohttp engine)": service_client(httpx_aiohttp_engine),
}


async def measure(variant: Variant, base_url: str, *, calls: int, concurrency: int) -> float:
    """Client CPU milliseconds per call."""
    async with variant(base_url) as call:
        await _drive(call, WARMUP_CALLS, concurrency)
        started = time.process_time()
        await _drive(call, calls, concurrency)
        return (time.process_time() - started) * 1000 / calls


async def _drive(call: Call, calls: int, concurrency: int) -> None:
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def pin_cpus() -> tuple[set[int], set[int]] | None:
    """Client on one CPU, server on another: neither steals the other's core mid-run."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    client, server = {cpus[0]}, {cpus[1]}
    os.sched_setaffinity(0, client)
    return client, server


def start_server(cpus: set[int] | None) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-u", "-c", SERVER],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    found = re.match(r"ready (\d+)", line)
    if found is None:
        process.kill()
        raise SystemExit(f"benchmark server did not start: {line!r}")
    return process, f"http://127.0.0.1:{found.group(1)}"


async def run_all(base_url: str, args: argparse.Namespace) -> dict[str, dict[int, list[float]]]:
    samples: dict[str, dict[int, list[float]]] = {
        name: {c: [] for c in args.concurrency} for name in VARIANTS
    }
    names = list(VARIANTS)
    for run in range(args.runs):
        for concurrency in args.concurrency:
            # Rotate the order each run: no variant always goes first (or last).
            for name in names[run % len(names) :] + names[: run % len(names)]:
                cpu = await measure(
                    VARIANTS[name], base_url, calls=args.calls, concurrency=concurrency
                )
                samples[name][concurrency].append(cpu)
                print(f"  run {run + 1} c={concurrency:<3} {name:<38} {cpu:.3f} ms", flush=True)
    return samples


def summarise(
    samples: dict[str, dict[int, list[float]]], concurrency: list[int]
) -> dict[str, dict[str, dict[str, Any]]]:
    medians = {n: {c: statistics.median(v) for c, v in by_c.items()} for n, by_c in samples.items()}
    baseline = medians["raw aiohttp"]
    return {
        name: {
            str(c): {
                "cpu_ms_per_call": round(medians[name][c], 4),
                "ratio_to_raw_aiohttp": round(medians[name][c] / baseline[c], 3),
                "runs_ms": [round(x, 4) for x in samples[name][c]],
            }
            for c in concurrency
        }
        for name in samples
    }


def print_table(summary: dict[str, dict[str, dict[str, Any]]], concurrency: list[int]) -> None:
    head = "".join(f"  c={c:<3} ms/call  x raw" for c in concurrency)
    print(f"\n{'client CPU per call (median)':<40}{head}")
    for name, by_c in summary.items():
        cells = "".join(
            f"  {v['cpu_ms_per_call']:>12.3f}  {v['ratio_to_raw_aiohttp']:>5.2f}"
            for v in (by_c[str(c)] for c in concurrency)
        )
        print(f"{name:<40}{cells}")
    ours = summary["ServiceClient (aiohttp engine)"]
    worst = max(v["ratio_to_raw_aiohttp"] for v in ours.values())
    verdict = "meets" if worst <= TARGET_RATIO else "MISSES"
    print(f"\nServiceClient (aiohttp engine) {verdict} the {TARGET_RATIO}x target (worst {worst}x)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per measurement")
    parser.add_argument("--runs", type=int, default=5, help="measurements per variant (>= 3)")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16]
    )
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--pin", action="store_true", help="client and server each on a CPU of their own"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3 (the median of fewer says little)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pinned = pin_cpus() if args.pin else None
    server, base_url = start_server(pinned[1] if pinned else None)
    try:
        runner = _runner(args.loop)
        samples = runner(run_all(base_url, args))
    finally:
        server.kill()
        server.wait()
    summary = summarise(samples, args.concurrency)
    print_table(summary, args.concurrency)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "what": "client CPU ms per call to a small FastAPI endpoint (uvicorn, loopback)",
        "target": f"ServiceClient <= {TARGET_RATIO}x raw aiohttp",
        "calls_per_run": args.calls,
        "runs": args.runs,
        "loop": args.loop,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "pinned": {"client": sorted(pinned[0]), "server": sorted(pinned[1])} if pinned else None,
        "aiohttp": aiohttp.__version__,
        "httpx": httpx.__version__,
        "results": summary,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _runner(loop: str) -> Callable[[Any], Any]:
    if loop == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


if __name__ == "__main__":
    main()
