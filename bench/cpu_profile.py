"""Where a saga's CPU goes: CPU-ms per order per component, and optionally a py-spy profile.

Not a figure of ``bench.run``: a diagnostic. It starts a saga bench stack of its own (fresh
databases, a private vhost), drives the saga group's closed loop (32 clients, happy orders)
and reads, around each window, the CPU time of every process that serves an order: the four
services, Postgres (every backend), RabbitMQ, etcd, the stack's supervisord, this driver,
and the whole machine (which includes any neighbour). It also reads each service
database's transactions per order (``pg_stat_database``).

With ``--py-spy`` (installed outside the project, e.g. ``python3 -m venv /tmp/pyspy &&
/tmp/pyspy/bin/pip install py-spy``; run as root), one more window is sampled in each
service (``--nonblocking``, 100 Hz, idle threads left out) and each sample is counted
against the deepest library or own module on its stack (asyncpg, AMQP, aiohttp client,
Starlette/FastAPI, the event loop's native code, ...). py-spy counts a runnable thread
waiting for a CPU as busy, so compare shares within a process, not samples across them.

    uv run python -m bench.cpu_profile
    uv run python -m bench.cpu_profile --py-spy /tmp/pyspy/bin/py-spy --out /tmp/profile
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.bare_saga import connect
from bench.saga import (
    POSTGRES_URL,
    SAGA_PORT_OFFSET,
    STACK_ENV,
    TOP_UP_MONEY,
    TOP_UP_UNITS,
    LocalStack,
    closed_loop,
    local_stack,
    machine_cpu,
    process_cpu,
)

PORT_OFFSET = SAGA_PORT_OFFSET + 500  # 34500-34503: beside the saga group's stack
SERVICES = ("order-1", "inventory-1", "payment-1", "shipping-1")


# -- CPU per component ------------------------------------------------------------------------


def component_pids(stack: LocalStack) -> dict[str, list[int]]:
    """Process ids by component: each service, etcd, Postgres, RabbitMQ, supervisord, us."""
    programs = stack.pids()
    found: dict[str, list[int]] = {p: [programs[p]] for p in (*SERVICES, "etcd")}
    found |= {"postgres": [], "rabbitmq": [], "supervisord": [], "driver": [os.getpid()]}
    marker = str(stack.run_dir)
    for pid, name, command in _processes():
        if name.startswith("postgres"):
            found["postgres"].append(pid)
        elif name.startswith(("beam", "erl_child", "epmd")):
            found["rabbitmq"].append(pid)
        elif "supervisord" in command and marker in command:
            found["supervisord"].append(pid)
    return found


def _processes() -> Iterator[tuple[int, str, str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        yield int(entry.name), name, command


async def transactions(stack: LocalStack) -> dict[str, int]:
    """Transactions (commits and rollbacks) so far, by service database."""
    conn = await connect(f"{POSTGRES_URL.rstrip('/')}/postgres")
    try:
        rows = await conn.fetch(
            "SELECT datname, xact_commit + xact_rollback AS n FROM pg_stat_database"
            " WHERE datname LIKE $1",
            f"{stack.prefix}_%",
        )
    finally:
        await conn.close()
    return {row["datname"].rsplit("_", 1)[1]: row["n"] for row in rows}


async def measure_window(stack: LocalStack, *, seconds: float) -> dict[str, float]:
    """One closed-loop window: CPU-ms per completed order by component, transactions per
    order by database, and the rate. Backends opened during warm-up are counted: the pids
    are read after it."""
    await stack.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
    services = [stack.pids()[p] for p in SERVICES]
    await closed_loop(stack.url("order-1"), services, warmup=1, duration=1)  # pools filled
    pids = component_pids(stack)
    before = {c: process_cpu(p) for c, p in pids.items()} | {"machine": machine_cpu()}
    xacts = await transactions(stack)
    result = await closed_loop(stack.url("order-1"), services, warmup=0, duration=seconds)
    after = {c: process_cpu(p) for c, p in pids.items()} | {"machine": machine_cpu()}
    done = max(1, result.completed)
    figures = {c: 1000 * (after[c] - before[c]) / done for c in after}
    figures["services"] = sum(figures[p] for p in SERVICES)
    now = await transactions(stack)
    figures |= {f"transactions {db}": (now[db] - xacts.get(db, 0)) / done for db in now}
    figures["orders/s"] = result.rate
    return figures


def print_medians(windows: Sequence[dict[str, float]]) -> None:
    """Each figure's median over the windows (min-max beside it)."""
    print(f"\n{'per order':<26} {'median':>8}  (min-max over {len(windows)} windows)")
    for key in windows[0]:
        values = [w[key] for w in windows if key in w]
        unit = "" if key.startswith(("transactions", "orders")) else " CPU-ms"
        print(
            f"{key:<26} {statistics.median(values):8.2f}{unit}"
            f"  ({min(values):.2f}-{max(values):.2f})"
        )


# -- py-spy ---------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")
# Modules a sample passes through on its way to the code that asked for the work: the
# sample counts against the caller (asyncio's streams against aiormq, ssl against asyncpg).
_TRANSPARENT = {
    "asyncio", "contextlib", "ssl", "typing", "<string>", "functools", "abc", "enum",
    "dataclasses", "weakref", "copy", "re", "collections", "datetime", "uuid", "decimal",
    "inspect", "types", "urllib", "socket", "base64", "hmac", "hashlib", "http", "email",
}  # fmt: skip
_COMPONENT = {
    "asyncpg": "asyncpg",
    "aiohttp": "aiohttp client",
    "yarl": "aiohttp client",
    "multidict": "aiohttp client",
    "aiormq": "AMQP (aio-pika, aiormq, pamqp)",
    "aio_pika": "AMQP (aio-pika, aiormq, pamqp)",
    "pamqp": "AMQP (aio-pika, aiormq, pamqp)",
    "uvicorn": "uvicorn",
    "starlette": "Starlette/FastAPI",
    "fastapi": "Starlette/FastAPI",
    "pydantic": "pydantic",
    "structlog": "logging",
    "logging": "logging",
    "ordermesh_shared/logging": "logging",
    "prometheus_client": "prometheus",
    "ordermesh_shared/metrics": "prometheus",
    "opentelemetry": "OpenTelemetry",
    "ordermesh_shared/tracing": "OpenTelemetry",
    "json": "json",
    "orjson": "json",
}


def module_of(path: str) -> str:
    """``ordermesh_shared/<package>``, ``service:<module>`` or a library's top package."""
    parts = path.split("/")
    if parts[0] == "ordermesh_shared" and len(parts) > 1:
        return "ordermesh_shared/" + parts[1].removesuffix(".py")
    if parts[0] in ("order", "inventory", "payment", "shipping") and len(parts) > 1:
        return "service:" + parts[-1].removesuffix(".py")
    return parts[0].removesuffix(".py")


def component_of(stack: Sequence[tuple[str, str]]) -> str:
    """The deepest non-transparent module on a sample's stack (root first), by component."""
    if stack and stack[-1][0] == "Runner.run":  # uvloop's C loop: epoll, sockets, callbacks
        return "event loop (uvloop, native)"
    for _function, path in reversed(stack):
        module = module_of(path)
        if module not in _TRANSPARENT:
            return _COMPONENT.get(module, module)
    return "other"


def read_raw(path: Path) -> Iterator[tuple[list[tuple[str, str]], int]]:
    """py-spy's ``--format raw``: ``frame;frame;... count`` lines, root first."""
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        stack = []
        for frame in frames.split(";"):
            match = _FRAME.match(frame)
            stack.append((match["function"], match["file"]) if match else (frame, "?"))
        yield stack, int(count)


def print_breakdown(path: Path, *, top: int = 14) -> None:
    """Each component's share of one service's samples."""
    shares: collections.Counter[str] = collections.Counter()
    for stack, count in read_raw(path):
        shares[component_of(stack)] += count
    total = sum(shares.values()) or 1
    print(f"\n{path.stem}: {total} samples")
    for name, count in shares.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {name}")


async def sample_services(stack: LocalStack, spy: str, out: Path, *, seconds: int) -> None:
    """One closed-loop window with py-spy recording each service; raw files into ``out``."""
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    await stack.top_up(units=TOP_UP_UNITS, money=TOP_UP_MONEY)
    pids = stack.pids()
    spies = [
        await asyncio.create_subprocess_exec(
            *(spy, "record", "--nonblocking", "--rate", "100", "--format", "raw"),
            *("--duration", str(seconds), "--pid", str(pids[program])),
            *("--output", str(out / f"{program}.txt")),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for program in SERVICES
    ]
    services = [pids[p] for p in SERVICES]
    await closed_loop(stack.url("order-1"), services, warmup=0.5, duration=seconds - 1)
    for spy_process in spies:
        await spy_process.wait()
    for program in SERVICES:
        print_breakdown(out / f"{program}.txt")


# -- main -----------------------------------------------------------------------------------


async def profile(args: argparse.Namespace) -> None:
    async with local_stack(port_offset=PORT_OFFSET, env=STACK_ENV) as stack:
        windows = []
        for n in range(args.windows):
            windows.append(await measure_window(stack, seconds=args.seconds))
            print(f"window {n + 1}: {windows[-1]['orders/s']:.1f} orders/s", flush=True)
        print_medians(windows)
        if args.py_spy:
            await sample_services(stack, args.py_spy, args.out, seconds=20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=3, help="closed-loop windows (3)")
    parser.add_argument("--seconds", type=float, default=8, help="length of each window (8)")
    parser.add_argument("--py-spy", help="py-spy's path: also sample each service")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    args = parser.parse_args(argv)
    asyncio.run(profile(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
