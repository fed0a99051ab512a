"""``make bench``: every benchmark figure, a table, and ``bench/results/latest.json``.

Each figure is the median of at least 3 runs (with min and max), measured side by side with
its baseline in the same run: these machines are shared and noisy, so only ratios measured
together mean much. Groups (``--only``):

* ``saga``       saga throughput vs the four-hop bare saga, latency at 25/50/100 orders/s
                 (bench/saga.py)
* ``client_cpu`` ServiceClient CPU per call vs raw aiohttp and httpx (bench/client_cpu.py)
* ``etcd_client`` EtcdClient CPU per call (a read, a lease renewal) vs raw aiohttp, and over
                 httpx, its previous engine (bench/etcd_client.py)
* ``relay``      relay events/s vs raw pipelined publish and the seed's relay, commit ->
                 consumer latency at 1,000 and 500 events/s vs the seed's polling relay
                 (bench/relay.py)
* ``failover``   open-breaker rejection, dead instance, relay leader failover, saga recovery
                 (bench/failover.py)
* ``goodput``    goodput at 2x saturation with load shedding on and off, in-flight sagas at a
                 sustainable rate (bench/goodput.py)
* ``timeline_worker`` the timeline consumer in a process of its own against inline: saga
                 throughput, CPU per order, p99 at 100/s (bench/timeline_worker.py)
* ``tracing``    tracing's cost per order: spans exported to a local OTLP sink against tracing
                 off (bench/tracing_cost.py)

Every measured window of the platform records its backlog (outbox rows pending, messages
queued: bench/backlog.py) at its start and end; a window whose backlog grew flags its
figures ``(!)``. A figure that could not be measured (the saga-recovery run that catches no
saga in flight, after its retries) is listed as not measured; the last line says how many
figures were measured. The exit code is 1 only when a group broke.

    uv run python -m bench.run                  # everything (~15 min) -> results/latest.json
    uv run python -m bench.run --smoke          # each figure once, briefly -> results/smoke.json
    uv run python -m bench.run --only failover  # one group -> results/failover.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
import uvloop

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
if __package__ in (None, ""):  # run as a script: make ``bench.*`` importable
    sys.path.insert(0, str(BENCH.parent))

PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "aiohttp",
    "httpx",
    "asyncpg",
    "aio-pika",
    "pybreaker",
    "tenacity",
    "pydantic",
    "orjson",
    "structlog",
)

if TYPE_CHECKING:  # at run time bench modules import lazily, once the path is set
    from bench.saga import Figure, Target

Group = Callable[[bool], Awaitable[list["Figure"]]]


# -- the groups --------------------------------------------------------------------------------


async def saga_group(smoke: bool) -> list[Figure]:
    from bench import saga

    return await saga.measure(smoke=smoke)


async def goodput_group(smoke: bool) -> list[Figure]:
    from bench import goodput

    return await goodput.measure(smoke=smoke)


async def timeline_worker_group(smoke: bool) -> list[Figure]:
    from bench import timeline_worker

    return await timeline_worker.measure(smoke=smoke)


async def tracing_group(smoke: bool) -> list[Figure]:
    from bench import tracing_cost

    return await tracing_cost.measure(smoke=smoke)


async def failover_group(smoke: bool) -> list[Figure]:
    from bench import failover

    return await failover.measure(smoke=smoke)


async def client_cpu_group(smoke: bool) -> list[Figure]:
    """bench/client_cpu.py in a process of its own (it measures its own process's CPU)."""
    from bench.saga import Figure, Target

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "client_cpu.json"
        calls = "300" if smoke else "3000"
        await _child("client_cpu.py", "--runs", "5", "--calls", calls, "--out", str(out))
        report = json.loads(out.read_text())["results"]
    raw = report["raw aiohttp"]
    figures = []
    for concurrency in raw:
        baseline = raw[concurrency]["runs_ms"]
        for variant, target in (
            ("ServiceClient (aiohttp engine)", Target("ratio", "<=", 1.3, "<= 1.3x raw aiohttp")),
            ("raw httpx (default transport)", None),
        ):
            runs = report[variant][concurrency]["runs_ms"]
            figures.append(
                Figure(
                    f"{variant} CPU per call, {concurrency} concurrent",
                    "CPU-ms",
                    runs,
                    baseline,
                    "raw aiohttp",
                    target,
                    note="client-side CPU, small FastAPI endpoint on loopback (client_cpu.py)",
                )
            )
    return figures


async def etcd_client_group(smoke: bool) -> list[Figure]:
    """bench/etcd_client.py in a process of its own (it measures its own process's CPU)."""
    from bench.saga import Figure, Target

    etcd_target = Target("ratio", "<=", 1.5, "<= 1.5x raw aiohttp")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "etcd_client.json"
        calls = "300" if smoke else "2000"
        await _child("etcd_client.py", "--runs", "3" if smoke else "5", "--calls", calls,
                     "--out", str(out))  # fmt: skip
        results = json.loads(out.read_text())["results"]
    figures = []
    for operation, by_variant in results.items():
        raw = by_variant["raw aiohttp"]
        for concurrency, baseline in raw.items():
            for label, variant, target in (
                ("EtcdClient", "EtcdClient (default: aiohttp)", etcd_target),
                ("EtcdClient over httpx", "EtcdClient over httpx (the previous engine)", None),
            ):
                figures.append(
                    Figure(
                        f"{label} CPU per {operation}, {concurrency} concurrent",
                        "CPU-ms",
                        by_variant[variant][concurrency]["runs_ms"],
                        baseline["runs_ms"],
                        "raw aiohttp",
                        target,
                        note="client-side CPU, private etcd on loopback (etcd_client.py)",
                    )
                )
    return figures


async def relay_group(smoke: bool) -> list[Figure]:
    """bench/relay.py's throughput variants and its commit -> consumer latency (ours and the
    seed's polling relay, at 1,000 and 500 events/s), 3 runs each."""
    from bench import relay
    from bench.saga import Target

    runs = 1 if smoke else 3
    seconds = 2.0 if smoke else 5.0
    async with relay.scratch(500) as scratch:
        variants = await relay.throughput(scratch, events=2000 if smoke else 10_000, runs=runs)
        lags: dict[tuple[str, int], list[dict[str, Any]]] = {
            ("ours", 1000): [],
            ("seed", 1000): [],
            ("ours", 500): [],
            ("seed", 500): [],
        }
        for _ in range(runs):  # alternating: a noisy moment hits every variant
            for (which, rate), results in lags.items():
                lag = await relay.latency(scratch, rate=float(rate), seconds=seconds, relay=which)
                print(f"  latency {which} relay at {rate}/s: p50 {lag['p50_ms']:.1f} ms,"
                      f" p99 {lag['p99_ms']:.1f} ms", flush=True)  # fmt: skip
                results.append(lag)
    ours = variants["relay"]["runs_events_per_s"]
    note = "outbox rows -> durable quorum queue, persistent, confirmed (bench/relay.py)"
    return [
        *_relay_throughput_figures(variants, ours, note),
        *_latency_figures(
            lags["ours", 1000],
            "1,000",
            Target("value", "<=", 50, "<= 50 ms"),
            seed=lags["seed", 1000],
        ),
        *_latency_figures(lags["ours", 500], "500", None, seed=lags["seed", 500]),
    ]


def _latency_figures(
    lags: list[dict[str, Any]],
    rate: str,
    p99_target: Target | None,
    *,
    seed: list[dict[str, Any]] | None = None,
) -> list[Figure]:
    from bench.saga import Figure

    note = (
        "the producer's COMMIT returning -> the consumer's handler (one machine clock); "
        "producer, relay and consumer are processes of their own"
    )
    detail: dict[str, Any] = {
        "achieved_events_per_s": [lag["achieved_events_per_s"] for lag in lags],
        "commit_to_relay_claim_p99_ms": [lag["relay_claimed_p99_ms"] for lag in lags],
    }
    if seed:
        # Past the seed's 500-800 events/s its backlog grows for the whole run: its latency
        # then says how far behind it fell, not how long its polling takes.
        detail["seed_achieved_events_per_s"] = [lag["achieved_events_per_s"] for lag in seed]
    baseline = f"seed polling relay ({relay_poll_ms()} ms ticker)" if seed else ""
    figures = []
    for point, key in (("p50", "p50_ms"), ("p99", "p99_ms")):
        figures.append(
            Figure(
                f"commit -> consumer latency {point} at {rate} events/s",
                "ms",
                [lag[key] for lag in lags],
                baseline_runs=[lag[key] for lag in seed or []],
                baseline_name=baseline,
                target=p99_target if point == "p99" else None,
                note=note,
                detail=detail if point == "p99" else {},
            )
        )
    return figures


def relay_poll_ms() -> int:
    """The seed relay's ticker in the latency runs, in ms."""
    from bench import relay

    return round(relay.SEED_POLL * 1000)


def _relay_throughput_figures(
    variants: dict[str, Any], ours: list[float], note: str
) -> list[Figure]:
    from bench.saga import Figure, Target

    return [
        Figure(
            "relay events/s vs raw pipelined publish",
            "events/s",
            ours,
            variants["broker"]["runs_events_per_s"],
            "raw aio-pika, pipelined confirms",
            Target("ratio", ">=", 0.7, ">= 0.7x raw publish"),
            note=note,
        ),
        Figure(
            "relay events/s vs the seed's relay",
            "events/s",
            ours,
            variants["seed"]["runs_events_per_s"],
            "seed relay (100 rows, one publish and update at a time)",
            Target("ratio", ">=", 5, ">= 5x seed relay"),
            note=note,
        ),
    ]


GROUPS: dict[str, tuple[str, Group]] = {
    "saga": ("saga.py", saga_group),
    "client_cpu": ("client_cpu.py", client_cpu_group),
    "etcd_client": ("etcd_client.py", etcd_client_group),
    "relay": ("relay.py", relay_group),
    "failover": ("failover.py", failover_group),
    "goodput": ("goodput.py", goodput_group),
    "timeline_worker": ("timeline_worker.py", timeline_worker_group),
    "tracing": ("tracing_cost.py", tracing_group),
}


async def _child(script: str, *args: str) -> None:
    process = await asyncio.create_subprocess_exec(sys.executable, str(BENCH / script), *args)
    if await process.wait() != 0:
        raise RuntimeError(f"{script} exited with {process.returncode}")


# -- running -----------------------------------------------------------------------------------


async def run_groups(names: list[str], *, smoke: bool) -> tuple[list[Figure], dict[str, str]]:
    """Run each group in turn; a group that fails is reported, the others still run."""
    figures: list[Figure] = []
    problems: dict[str, str] = {}
    for name in names:
        script, group = GROUPS[name]
        if not (BENCH / script).exists():
            problems[name] = f"left out: bench/{script} does not exist"
            print(f"== {name}: {problems[name]}", flush=True)
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            figures += await group(smoke)
        except Exception as exc:  # one broken group must not cost the others' figures
            traceback.print_exc()
            problems[name] = f"failed: {type(exc).__name__}: {exc}"
        print(f"== {name} took {time.monotonic() - started:.0f} s", flush=True)
    return figures, problems


def machine_info() -> dict[str, Any]:
    """CPU, cores, OS, Python and the versions of the packages on the measured paths."""
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "postgres": _postgres(),
        "etcd": _first_line(["etcd", "--version"]),
        "rabbitmq": _first_line(["rabbitmqctl", "-q", "version"]),
        "load_average_at_start": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _first_line(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if lines else None


def _postgres() -> dict[str, Any]:
    """Server version and connection slots: the bench needs about 80 free (a stack and the
    bare saga at once), and the server is shared with whatever else runs here."""
    from bench.bare_saga import connect
    from bench.saga import POSTGRES_URL

    async def ask() -> dict[str, Any]:
        conn = await connect(f"{POSTGRES_URL.rstrip('/')}/postgres")
        try:
            return {
                "version": await conn.fetchval("SHOW server_version"),
                "max_connections": int(await conn.fetchval("SHOW max_connections")),
                "connections_in_use_at_start": await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                ),
            }
        finally:
            await conn.close()

    try:
        return asyncio.run(ask())
    except (OSError, asyncpg.PostgresError) as exc:
        return {"error": str(exc)}


# -- output ------------------------------------------------------------------------------------


def print_table(figures: list[dict[str, Any]], problems: dict[str, str]) -> None:
    """The results as a fixed-width table (what the README shows)."""
    print()
    print(f"{'figure':<58} {'value':>10} {'unit':<9} {'baseline':>10} {'ratio':>6}"
          f"  {'target':<24} met")  # fmt: skip
    for f in figures:
        met = {True: "yes", False: "NO", None: "-"}[f["met"]]
        flagged = " (!)" if f["flags"] else ""
        print(
            f"{f['name'][:58]:<58} {_cell(f['value']):>10} {f['unit']:<9}"
            f" {_cell(f['baseline']):>10} {_ratio(f['ratio']):>6}  {f['target'] or '-':<24} {met}"
            f"{flagged}"
        )
    for f in figures:
        for flag in f["flags"]:
            print(f"(!) {f['name']}: {flag}")
        if not f["measured"]:
            print(f"not measured: {f['name']}: {f['not_measured']}")
    for name, problem in problems.items():
        print(f"{name}: {problem}")
    print(summary_line(summarise(figures, problems)))


def summarise(figures: list[dict[str, Any]], problems: dict[str, str]) -> dict[str, Any]:
    """How many figures the run measured, met and flagged; the groups it lost."""
    measured = [f for f in figures if f["measured"]]
    judged = [f for f in measured if f["met"] is not None]
    return {
        "figures": len(figures),
        "measured": len(measured),
        "not_measured": [f["name"] for f in figures if not f["measured"]],
        "with_target": len(judged),
        "met": sum(1 for f in judged if f["met"]),
        "flagged": [f["name"] for f in figures if f["flags"]],
        "groups_failed": [name for name, p in problems.items() if p.startswith("failed")],
    }


def summary_line(summary: dict[str, Any]) -> str:
    """The run's summary in one line."""
    line = (
        f"\n{summary['measured']} of {summary['figures']} figures measured;"
        f" {summary['met']} of {summary['with_target']} targets met;"
        f" {len(summary['flagged'])} flagged"
    )
    if summary["groups_failed"]:
        line += f"; groups failed: {', '.join(summary['groups_failed'])}"
    return line


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    # Three decimals near 1: a ratio of 1.3004 against a 1.3x target must not print "1.3".
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the JSON report (creating bench/results/ if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="each figure once, briefly")
    parser.add_argument("--only", choices=list(GROUPS), help="run one group")
    parser.add_argument("--out", type=Path, help="where to write the JSON report")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / (
            "smoke.json" if args.smoke else f"{args.only}.json" if args.only else "latest.json"
        )
    return args


async def _main(names: list[str], smoke: bool) -> tuple[list[Figure], dict[str, str]]:
    # SIGTERM (timeout, CI) cancels like Ctrl-C: every stack is stopped, every database dropped.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    return await run_groups(names, smoke=smoke)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; exit 0 unless a group broke (1). A target missed, a flagged window
    or a figure not measured (reported as such) is a result, not a failure."""
    args = parse_args(argv)
    # The shared library's clients log every retry and breaker change; here those are the
    # expected effect of the faults we inject, not news.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    names = [args.only] if args.only else list(GROUPS)
    started = datetime.now(UTC)
    machine = machine_info()
    figures, problems = uvloop.run(_main(names, args.smoke))
    machine["load_average_at_end"] = list(os.getloadavg())
    listed = [f.as_json() for f in figures]
    print_table(listed, problems)
    report = {
        "what": "Ordermesh benchmarks (bench/README.md)",
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started).total_seconds()),
        "mode": "smoke" if args.smoke else "full",
        "machine": machine,
        "summary": summarise(listed, problems),
        "figures": listed,
        "left_out": problems,
    }
    write_report(args.out, report)
    return 1 if any(p.startswith("failed") for p in problems.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
