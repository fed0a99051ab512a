"""etcd client CPU per call: EtcdClient over each engine, against raw aiohttp.

A private single-node etcd runs in a child process; this process makes the calls and
measures only its own CPU time (``time.process_time``), so the figure is what a caller pays
per call. A call is a read of one key (``/v3/kv/range``) or a lease renewal
(``/v3/lease/keepalive``: what every lease holder does every TTL/4), the raw variant posts the
same bytes and reads the whole answer. Variants run interleaved, in a rotating order, so a
noisy neighbour hurts them all alike; the median of ``--runs`` is kept.

    uv run python bench/etcd_client.py                # table + bench/results/etcd_client.json
    uv run python bench/etcd_client.py --calls 500 --runs 3 --concurrency 1

The httpx variant is the client's previous engine (httpx 0.28 with its default transport).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from ordermesh_shared.etcd_client import EtcdClient

RESULTS = Path(__file__).resolve().parent / "results" / "etcd_client.json"
WARMUP_CALLS = 100
KEY = "/bench/etcd-client/key"
BASELINE = "raw aiohttp"

Call = Callable[[], Awaitable[None]]
Variant = Callable[[str, int], AbstractAsyncContextManager[Call]]  # (url, lease) -> call


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def raw_aiohttp(operation: str) -> Variant:
    @asynccontextmanager
    async def variant(url: str, lease: int) -> AsyncIterator[Call]:
        path, body = _raw_request(operation, lease)
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:

            async def call() -> None:
                async with session.post(url + path, data=orjson.dumps(body), headers=headers) as r:
                    await r.read()

            yield call

    return variant


def _raw_request(operation: str, lease: int) -> tuple[str, dict[str, str]]:
    if operation == "get":
        return "/v3/kv/range", {"key": _b64(KEY)}
    return "/v3/lease/keepalive", {"ID": str(lease)}


def etcd_client(operation: str, *, httpx_engine: bool) -> Variant:
    @asynccontextmanager
    async def variant(url: str, lease: int) -> AsyncIterator[Call]:
        transport = httpx.AsyncHTTPTransport() if httpx_engine else None
        async with EtcdClient(url, transport=transport) as etcd:

            async def get() -> None:
                await etcd.get(KEY)

            async def keepalive() -> None:
                await etcd.lease_keepalive(lease)

            yield get if operation == "get" else keepalive

    return variant


def variants(operation: str) -> dict[str, Variant]:
    """The variants measured for one operation, the baseline first."""
    return {
        BASELINE: raw_aiohttp(operation),
        "EtcdClient (default: aiohttp)": etcd_client(operation, httpx_engine=False),
        "EtcdClient over httpx (the previous engine)": etcd_client(operation, httpx_engine=True),
    }


async def measure(variant: Variant, url: str, lease: int, *, calls: int, concurrency: int) -> float:
    """Client CPU milliseconds per call."""
    async with variant(url, lease) as call:
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


# -- a private etcd ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def private_etcd() -> Iterator[str]:
    """A single-node etcd in a scratch directory (its client URL), killed on exit."""
    binary = shutil.which("etcd")
    if binary is None:
        raise SystemExit("etcd not found on PATH (Debian: etcd-server)")
    scratch = Path(tempfile.mkdtemp(prefix="om-bench-etcd-"))
    client, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    command = [
        *(binary, "--data-dir", str(scratch / "data")),
        *("--listen-client-urls", client, "--advertise-client-urls", client),
        *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
        *("--initial-cluster", f"default={peer}"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(client, process)
        yield client
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"etcd exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).json().get("health") == "true":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit("etcd did not become healthy within 20 s")


# -- running -----------------------------------------------------------------------------------


Samples = dict[str, dict[str, dict[int, list[float]]]]  # operation -> variant -> c -> runs


async def run_all(url: str, args: argparse.Namespace) -> Samples:
    async with EtcdClient(url) as etcd:
        await etcd.put(KEY, "x" * 64)
        lease = await etcd.lease_grant(600)
    samples: Samples = {
        op: {name: {c: [] for c in args.concurrency} for name in variants(op)}
        for op in args.operations
    }
    for run in range(args.runs):
        for op in args.operations:
            chosen = variants(op)
            names = list(chosen)
            for concurrency in args.concurrency:
                # Rotate the order each run: no variant always goes first (or last).
                for name in names[run % len(names) :] + names[: run % len(names)]:
                    cpu = await measure(
                        chosen[name], url, lease, calls=args.calls, concurrency=concurrency
                    )
                    samples[op][name][concurrency].append(cpu)
                    print(f"  run {run + 1} {op:<9} c={concurrency:<3} {name:<44} {cpu:.3f} ms",
                          flush=True)  # fmt: skip
    return samples


def summarise(samples: Samples) -> dict[str, Any]:
    """Per operation, variant and concurrency: the median, its ratio to raw aiohttp, the runs;
    and the httpx engine's CPU per call over the aiohttp one's (median of per-run ratios:
    each pair ran at the same moment)."""
    out: dict[str, Any] = {}
    for op, by_variant in samples.items():
        out[op] = {}
        for name, by_c in by_variant.items():
            out[op][name] = {
                str(c): {
                    "cpu_ms_per_call": round(statistics.median(runs), 4),
                    "ratio_to_raw_aiohttp": round(_paired_ratio(runs, by_variant[BASELINE][c]), 3),
                    "runs_ms": [round(x, 4) for x in runs],
                }
                for c, runs in by_c.items()
            }
    return out


def _paired_ratio(runs: list[float], baseline: list[float]) -> float:
    return statistics.median([a / b for a, b in zip(runs, baseline, strict=True) if b])


def print_table(summary: dict[str, Any]) -> None:
    for op, by_variant in summary.items():
        print(f"\n{op}: client CPU per call (median)")
        for name, by_c in by_variant.items():
            cells = "".join(
                f"  c={c:<3} {v['cpu_ms_per_call']:7.3f} ms {v['ratio_to_raw_aiohttp']:5.2f}x"
                for c, v in by_c.items()
            )
            print(f"  {name:<44}{cells}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--runs", type=int, default=5, help="measurements per variant (>= 3)")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16]
    )
    parser.add_argument("--operations", type=lambda s: s.split(","), default=["get", "keepalive"])
    parser.add_argument("--etcd-url", help="an etcd to use instead of a private one")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3 (the median of fewer says little)")
    return args


def main(argv: list[str] | None = None) -> None:
    import uvloop

    args = parse_args(argv)
    load_before = os.getloadavg()
    if args.etcd_url:
        samples = uvloop.run(run_all(args.etcd_url, args))
    else:
        with private_etcd() as url:
            samples = uvloop.run(run_all(url, args))
    summary = summarise(samples)
    print_table(summary)
    report = {
        "what": "client CPU ms per etcd call (JSON gateway, loopback), same run, interleaved",
        "calls_per_run": args.calls,
        "runs": args.runs,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
        "aiohttp": aiohttp.__version__,
        "httpx": httpx.__version__,
        "results": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
