"""Open-loop load generator for the order API.

Orders arrive at a fixed rate whatever the platform's latency (open loop: a slow platform
gets a queue, as it would from real users, instead of a politely slower client). A seeded mix
of customers, products and destinations makes some orders fail on purpose (declines,
unsupported destinations, scarce stock), so compensations run under load too.

    ordermesh-load --rate 50 --duration 60          # the running stack's order API
    ordermesh-load --target compose --rate 20 --duration 10 --seed 7
    ordermesh-load --url http://localhost:8000 --rate 20 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ordermesh_deploy import stacks

TERMINAL = ("completed", "cancelled", "compensation_failed")
# (customer, weight): dave and carol run out of money, which exercises refunds.
CUSTOMERS = (("alice", 6), ("bob", 3), ("carol", 1), ("dave", 1))
SKUS = (("CB-404", 6), ("MS-202", 4), ("KB-101", 3), ("MN-303", 1), ("HP-505", 1))
DESTINATIONS = (("DE", 8), ("FR", 4), ("US", 3), ("AQ", 1))


@dataclass
class LoadResult:
    """What happened to the orders sent."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    order_ids: list[str] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        """Latency percentile in ms (0 when nothing answered)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> str:
        """A few human lines."""
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) or "none"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"orders sent {self.sent}: {outcomes}\n"
            f"latency ms p50 {self.percentile(50):.1f}  p95 {self.percentile(95):.1f}"
            f"  p99 {self.percentile(99):.1f}\n"
            f"errors: {errors}"
        )


def _pick(rng: random.Random, weighted: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def random_order(rng: random.Random) -> dict[str, Any]:
    """One order from the seeded mix."""
    skus = {_pick(rng, SKUS) for _ in range(rng.randint(1, 2))}
    return {
        "customer_id": _pick(rng, CUSTOMERS),
        "items": [{"sku": sku, "quantity": rng.randint(1, 2)} for sku in sorted(skus)],
        "destination": _pick(rng, DESTINATIONS),
    }


async def place_one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], result: LoadResult
) -> None:
    """Post one order and record its outcome (status, or the kind of error)."""
    started = time.perf_counter()
    try:
        response = await client.post(f"{url}/orders", json=body)
    except httpx.HTTPError as exc:
        result.errors[type(exc).__name__] += 1
        return
    result.latencies.append(time.perf_counter() - started)
    if response.status_code in (200, 201, 202):
        order = response.json()
        result.order_ids.append(order["id"])
        result.outcomes[order["status"]] += 1
    else:
        result.errors[f"HTTP {response.status_code}"] += 1


async def run_load(
    url: str,
    *,
    rate: float,
    duration: float,
    seed: int = 1,
    progress: Callable[[LoadResult, float], None] | None = None,
) -> LoadResult:
    """Send orders at ``rate``/s for ``duration`` s; waits for the answers before returning."""
    rng = random.Random(seed)
    result = LoadResult()
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client, asyncio.TaskGroup() as tg:
        started = time.monotonic()
        total = int(rate * duration)
        for n in range(total):
            # Arrival times are fixed in advance: lateness does not thin the load.
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            result.sent += 1
            tg.create_task(place_one(client, url, random_order(rng), result))
            if progress is not None and n % max(1, int(rate // 4)) == 0:
                progress(result, time.monotonic() - started)
    return result


async def settle(url: str, order_ids: list[str], *, within: float = 60) -> Counter[str]:
    """Wait until every order is terminal (bounded); returns the final statuses."""
    final: Counter[str] = Counter()
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=10) as client:
        for order_id in order_ids:
            final[await _final_status(client, url, order_id, deadline)] += 1
    return final


async def _final_status(client: httpx.AsyncClient, url: str, order_id: str, deadline: float) -> str:
    status = "unknown"
    while time.monotonic() < deadline:
        try:
            status = (await client.get(f"{url}/orders/{order_id}")).json()["status"]
        except (httpx.HTTPError, KeyError, ValueError):
            status = "unreachable"
        if status in TERMINAL:
            return status
        await asyncio.sleep(0.2)
    return status


def _show(result: LoadResult, elapsed: float) -> None:
    done = sum(result.outcomes.values()) + sum(result.errors.values())
    line = (
        f"\r{elapsed:5.1f}s sent {result.sent} answered {done}"
        f" p50 {result.percentile(50):.0f} ms p99 {result.percentile(99):.0f} ms"
        f" errors {sum(result.errors.values())}"
    )
    print(line.ljust(90), end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ordermesh-load``."""
    parser = argparse.ArgumentParser(prog="ordermesh-load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="the order API (default: the running stack's)")
    stacks.add_target_arguments(parser)
    parser.add_argument("--rate", type=float, default=20, help="orders per second (default 20)")
    parser.add_argument("--duration", type=float, default=30, help="seconds (default 30)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order mix")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    if args.url is None:
        stack = stacks.find_or_exit(args.target, run_dir=args.run_dir)
        args.url = stacks.or_exit(lambda: stack.order_url)
        print(f"load on the {stack.kind} stack's order API at {args.url}", file=sys.stderr)
    result = asyncio.run(
        run_load(args.url, rate=args.rate, duration=args.duration, seed=args.seed, progress=_show)
    )
    print(file=sys.stderr)
    final = asyncio.run(settle(args.url, result.order_ids))
    print(result.summary())
    print("final statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(final.items())))


if __name__ == "__main__":
    main()
