"""``make demo-cap``: CAP on the running stack, second by second, under steady load.

The story (about 40-60 s with the defaults; root, for the partitions):

1. steady: seeded open-loop orders (``--rate``/s) while a row is printed every second.
2. inventory is cut from order *and from RabbitMQ* for ``--cut`` s. Cutting the broker too
   keeps inventory's ``product_changed`` events in its outbox, so a price changed at
   inventory during the cut (admin ``PUT /products/{sku}/price``) can only reach order's
   catalogue replica after the heal. Meanwhile ``GET /catalogue`` answers from the replica
   with ``lag_seconds`` growing (AP), ``POST /orders`` still accepts orders whose sagas
   retry ``reserve_stock`` until their deadline and then compensate, and no reservation is
   made: inventory alone decides stock, so it is refused rather than guessed (CP).
3. healed: rows until the replica shows inventory's new price with the lag back near 0.
4. etcd is cut from everyone for ``--etcd-cut`` s while a lock probe, standing where an
   order instance stands (local: in its cgroup; compose: inside its container), takes and
   releases an etcd lock every second: held before, refused during, held again after
   (CP), while catalogue reads still answer (AP).
5. the load stops. On compose, a payment instance is killed while two views of its
   membership are read side by side: the watch-fed registry cache (Consul's blocking
   queries) drops it within a health check, DNS (SRV records with a 5 s TTL) keeps it until
   its cached answer runs out (``demo_dns``). The local stack registers in etcd, which
   answers no DNS: there the phase says so and is skipped.
6. the auditor checks every invariant, the price is set back.

Exit status 0 when every expectation held (reads answered with a growing lag, reservations
refused during the cut, the replica converged, the lock refused during the etcd cut, DNS
dropping the dead instance no sooner than the watch, the audit clean); 1 otherwise, naming
what did not happen.

    sudo -E make demo-cap
    sudo -E uv run python -m ordermesh_deploy.demo_cap --seed 7 --cut 6 --etcd-cut 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import structlog
from ordermesh_shared.admin import ADMIN_TOKEN_HEADER

from ordermesh_deploy import audit, demo_dns, load, lock_probe, partition, stacks
from ordermesh_deploy.partition_compose import ComposeCutter
from ordermesh_deploy.partition_local import CGROUP_DIR, LocalCutter, cgroup2_root

FIRST_CUT = (("inventory", "order"), ("inventory", "rabbitmq"))
ETCD_CUT = ("etcd", partition.ALL)
FILL_WAIT = 30.0  # seconds a cold catalogue replica is waited for before the demo starts
CONVERGED_LAG = 2.0  # seconds: "back near 0" for lag_seconds once events flow again
NOT_ROOT = (
    "demo-cap cuts the network with iptables and cgroups, which needs root:"
    " run it as root (sudo -E make demo-cap)"
)
LEGEND = """\
What each column shows, and the CAP choice behind it:
  catalogue   AP: GET /catalogue on order answers from its replica of inventory's catalogue,
              cut or not; lag s (staleness.lag_seconds) grows while inventory's events
              cannot arrive, and the price column shows the replica's / inventory's price.
  orders      AP at the door: POST /orders keeps accepting (201/202). sent = accepted;
              run = sagas running (waiting/retrying), comp = compensating, then done
              (completed), canc (cancelled), shed (429 and errors). Each saga retries
              within SAGA_DEADLINE, then compensates.
  reserve     CP: stock is decided by inventory alone. ok = reservations made; faults =
              reserve_stock attempts that failed (unreachable); gave up = sagas that hit
              their deadline and compensated. Money is CP too: no charge without a reservation.
  etcd lock   CP: an etcd lock taken where an order instance stands: refused while etcd is
              cut off (no quorum reachable, no lock), never granted on a guess."""


# --- what one second looks like --------------------------------------------------------------


@dataclass
class Catalogue:
    """One read of ``GET /catalogue`` and inventory's own price of the watched SKU."""

    answered: bool
    took_ms: float
    lag: float | None
    replica_price: Decimal | None
    inventory_price: Decimal | None

    def cell(self, sku: str) -> str:
        read = f"200 {self.took_ms:4.0f} ms" if self.answered else "refused    "
        lag = f"{self.lag:6.1f}" if self.lag is not None else "     -"
        prices = f"{_money(self.replica_price)} / {_money(self.inventory_price)}"
        differ = " !=" if self.replica_price != self.inventory_price else "   "
        return f"{read} {lag}  {prices:>17}{differ}"


def _money(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@dataclass
class Sagas:
    """The demo's orders as order's database has them."""

    statuses: Counter[str] = field(default_factory=Counter)
    reserved: int = 0
    refused: int = 0
    gave_up: int = 0
    faults: int = 0

    def cells(self, sent: int, shed: int) -> str:
        s = self.statuses
        orders = f"{sent:5} {s['running']:4} {s['compensating']:4} {s['completed']:5}"
        orders += f" {s['cancelled'] + s['compensation_failed']:4} {shed:4}"
        return f"{orders} | {self.reserved:5} {self.faults:6} {self.gave_up:7}"


@dataclass
class Row:
    """One printed second."""

    t: float
    phase: str
    catalogue: Catalogue
    sagas: Sagas
    sent: int
    shed: int
    lock: str


HEADER = (
    "    t  phase     | catalogue        lag s  {sku:>6} repl / inv   "
    "|  sent  run comp  done canc shed | rsv ok faults gave up | etcd lock"
)


def render(row: Row, sku: str) -> str:
    """A row of the table."""
    return (
        f"{row.t:5.1f}  {row.phase:<9} | {row.catalogue.cell(sku)} |"
        f" {row.sagas.cells(row.sent, row.shed)} | {row.lock}"
    )


# --- reading the stack -----------------------------------------------------------------------


RESERVE_SQL = """
SELECT count(*) FILTER (WHERE status = 'succeeded') AS reserved,
       count(*) FILTER (WHERE status = 'rejected') AS refused,
       count(*) FILTER (WHERE status = 'failed') AS gave_up,
       -- every attempt is counted; a success or a refusal is the last one, not a fault
       COALESCE(sum(attempts), 0)
         - count(*) FILTER (WHERE status IN ('succeeded', 'rejected')) AS faults
FROM saga_steps
WHERE saga_id = ANY($1::uuid[]) AND step = 'reserve_stock' AND direction = 'forward'
"""


async def read_sagas(conn: asyncpg.Connection, order_ids: list[str]) -> Sagas:
    """The demo's sagas by status, and their reserve steps."""
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM sagas WHERE id = ANY($1::uuid[]) GROUP BY status",
        order_ids,
    )
    step = await conn.fetchrow(RESERVE_SQL, order_ids)
    assert step is not None  # an aggregate always returns a row
    return Sagas(
        statuses=Counter({r["status"]: r["n"] for r in rows}),
        reserved=step["reserved"],
        refused=step["refused"],
        gave_up=step["gave_up"],
        faults=step["faults"],
    )


async def read_catalogue(http: httpx.AsyncClient, order_url: str, sku: str) -> Catalogue:
    """``GET /catalogue``: answered or not, its lag, and the watched SKU's price."""
    started = time.perf_counter()
    try:
        answer = await http.get(f"{order_url}/catalogue", timeout=2.0)
        answer.raise_for_status()
        body = answer.json()
    except (httpx.HTTPError, ValueError):
        return Catalogue(False, 0.0, None, None, None)
    took = (time.perf_counter() - started) * 1000
    prices = {p["sku"]: Decimal(p["price"]) for p in body["products"]}
    return Catalogue(True, took, body["staleness"]["lag_seconds"], prices.get(sku), None)


async def inventory_price(http: httpx.AsyncClient, inventory_url: str, sku: str) -> Decimal | None:
    """What inventory itself says (the host still reaches it: only order and the broker are
    cut from it)."""
    try:
        answer = await http.get(f"{inventory_url}/products/{sku}", timeout=1.0)
        return Decimal(answer.json()["price"]) if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


async def set_price(
    http: httpx.AsyncClient, inventory_url: str, sku: str, price: Decimal, token: str
) -> None:
    """Inventory's admin ``PUT /products/{sku}/price``."""
    answer = await http.put(
        f"{inventory_url}/products/{sku}/price",
        json={"price": str(price)},
        headers={ADMIN_TOKEN_HEADER: token},
        timeout=5.0,
    )
    if answer.status_code != 200:
        raise SystemExit(f"inventory refused the price change: {answer.status_code} {answer.text}")


# --- the load --------------------------------------------------------------------------------


async def steady_load(
    http: httpx.AsyncClient,
    url: str,
    result: load.LoadResult,
    *,
    rate: float,
    seed: int,
    stop: asyncio.Event,
) -> None:
    """Open-loop seeded orders at ``rate``/s until ``stop`` is set; then the answers still
    due are awaited."""
    rng = random.Random(seed)
    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        while not stop.is_set():
            # Arrival times are fixed in advance: a slow answer does not thin the load.
            due = started + result.sent / rate - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, due))
                break
            result.sent += 1
            tg.create_task(load.place_one(http, url, load.random_order(rng), result))


# --- the lock probe --------------------------------------------------------------------------


@dataclass
class Probe:
    """The lock probe's process and the attempts it reported."""

    process: asyncio.subprocess.Process
    attempts: list[tuple[float, str]] = field(default_factory=list)
    seen: int = 0

    def latest(self) -> str:
        """The newest attempt that ended since the last row was printed."""
        fresh, self.seen = self.attempts[self.seen :], len(self.attempts)
        return fresh[-1][1] if fresh else "(attempt under way)"

    async def read(self) -> None:
        """Collect the probe's lines until it ends."""
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            stamp, outcome, detail, ms = [*raw.decode().split(), "", "", ""][:4]
            with contextlib.suppress(ValueError):
                mark = f"#{detail}" if outcome == "held" else detail
                self.attempts.append((float(stamp), f"{outcome} {mark} ({ms} ms)"))


PROBE_SOURCE = Path(lock_probe.__file__)


async def start_probe(stack: stacks.Endpoints, seconds: float) -> Probe:
    """The probe where the first order instance stands (see the module's docstring)."""
    if isinstance(stack, stacks.ComposeEndpoints):
        order = next(c for c in stack.containers if c.service == "order" and c.up)
        url = order.env.get("ETCD_URL", "http://etcd:2379")
        argv = ["docker", "exec", "-i", order.id, "python3", "-", url, str(seconds)]
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert process.stdin is not None
        process.stdin.write(await asyncio.to_thread(PROBE_SOURCE.read_bytes))
        process.stdin.close()
    else:
        argv = [sys.executable, "-m", "ordermesh_deploy.lock_probe", stack.etcd_url, str(seconds)]
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    return Probe(process)


def move_into_cut(cutter: partition.Cutter, pid: int, program: str) -> None:
    """Local stack: put the probe in ``program``'s cgroup, whose packets the cut drops (its
    connections are made per attempt, so every later one is cut)."""
    if isinstance(cutter, LocalCutter):
        procs = cgroup2_root() / CGROUP_DIR / cutter.key / program / "cgroup.procs"
        procs.write_text(str(pid))


# --- the demonstration -----------------------------------------------------------------------


@dataclass
class Window:
    """The rows of one phase, for the verdict."""

    rows: list[Row] = field(default_factory=list)


class Demo:
    """Drives the phases and prints a row per second."""

    def __init__(
        self,
        args: argparse.Namespace,
        stack: stacks.Endpoints,
        http: httpx.AsyncClient,
        db: asyncpg.Connection,
    ) -> None:
        self.args = args
        self.stack = stack
        self.http = http
        self.db = db
        self.cutter = cutter_for(stack, args.run_dir)
        self.order_url = stacks.or_exit(lambda: stack.order_url)
        instances = stacks.or_exit(lambda: stack.instances)
        self.inventory_url = instances["inventory-1"]
        self.order_program = min(name for name in instances if name.startswith("order-"))
        self.token = stacks.or_exit(lambda: stack.admin_token)
        self.load = load.LoadResult()
        self.started = time.monotonic()
        self.probe: Probe | None = None
        self.sku = ""
        self.old_price = Decimal(0)
        self.at_cut = Sagas()  # the demo's sagas when the cut was made
        self.windows: dict[str, Window] = {}

    # -- rows --

    async def row(self, phase: str) -> Row:
        catalogue = await read_catalogue(self.http, self.order_url, self.sku)
        catalogue.inventory_price = await inventory_price(self.http, self.inventory_url, self.sku)
        sagas = await read_sagas(self.db, list(self.load.order_ids))
        shed = sum(self.load.errors.values())
        lock = self.probe.latest() if self.probe else "-"
        row = Row(
            time.monotonic() - self.started, phase, catalogue, sagas, self.load.sent, shed, lock
        )
        self.windows.setdefault(phase, Window()).rows.append(row)
        print(render(row, self.sku), flush=True)
        return row

    async def rows_for(self, seconds: float, phase: str) -> None:
        """A row at each whole second for ``seconds``."""
        begin = time.monotonic()
        for n in range(1, round(seconds) + 1):
            await asyncio.sleep(max(0.0, begin + n - time.monotonic()))
            await self.row(phase)

    async def rows_until(
        self, done: Callable[[Row], bool], *, within: float, phase: str
    ) -> float | None:
        """Rows every second until ``done(row)``; the seconds it took (None: not within)."""
        begin = time.monotonic()
        for n in range(1, round(within) + 1):
            await asyncio.sleep(max(0.0, begin + n - time.monotonic()))
            if done(await self.row(phase)):
                return time.monotonic() - begin
        return None

    def say(self, text: str) -> None:
        print(f"{time.monotonic() - self.started:5.1f}  -- {text}", flush=True)

    # -- cuts --

    @contextlib.asynccontextmanager
    async def cut(self, pairs: Sequence[tuple[str, str]], hold: float) -> AsyncIterator[None]:
        """The pairs cut (healed on the way out, whatever happens)."""
        try:
            for a, b in pairs:
                made = await asyncio.to_thread(partition.create, self.cutter, a, b, hold=hold)
                self.say(f"partition {made.a} <-> {made.b}")
            yield
        finally:
            for a, b in pairs:
                await asyncio.shield(asyncio.to_thread(partition.heal, self.cutter, a, b))
            self.say("healed " + ", ".join(f"{a} <-> {b}" for a, b in pairs))

    # -- the phases --

    async def story(self) -> float | None:
        """Phases 1-4; the seconds the replica took to converge after the heal."""
        args = self.args
        await self.rows_for(args.steady, "steady")
        old = self.old_price = await self.current_price()
        new = old + Decimal(random.Random(args.seed).randint(1, 9))
        async with self.cut(FIRST_CUT, hold=args.cut):
            self.at_cut = await read_sagas(self.db, list(self.load.order_ids))
            await self.rows_for(1, "CUT inv")
            await set_price(self.http, self.inventory_url, self.sku, new, self.token)
            self.say(f"inventory: {self.sku} price {old:.2f} -> {new:.2f} (admin PUT)")
            await self.rows_for(args.cut - 1, "CUT inv")
        converged = await self.rows_until(
            lambda r: _converged(r, new), within=args.converge, phase="healed"
        )
        await self.etcd_phase()
        return converged

    async def etcd_phase(self) -> None:
        args = self.args
        self.probe = await start_probe(self.stack, args.etcd_cut + args.converge + 6)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.probe.read())
            try:
                await self.rows_for(2, "etcd ok")
                async with self.cut([ETCD_CUT], hold=args.etcd_cut):
                    self.enter_cut()
                    await self.rows_for(args.etcd_cut, "CUT etcd")
                await self.rows_until(
                    lambda r: r.lock.startswith("held"), within=args.converge, phase="etcd back"
                )
            finally:
                self.stop_probe()

    def enter_cut(self) -> None:
        assert self.probe is not None
        move_into_cut(self.cutter, self.probe.process.pid, self.order_program)

    def stop_probe(self) -> None:
        if self.probe is not None and self.probe.process.returncode is None:
            # Compose: this ends the `docker exec` client; the probe ends itself in time.
            self.probe.process.kill()

    async def current_price(self) -> Decimal:
        price = await inventory_price(self.http, self.inventory_url, self.sku)
        if price is None:
            raise SystemExit(f"inventory at {self.inventory_url} does not show {self.sku}")
        return price


def _converged(row: Row, new: Decimal) -> bool:
    c = row.catalogue
    return c.replica_price == new and c.lag is not None and c.lag < CONVERGED_LAG


def cutter_for(stack: stacks.Endpoints, run_dir: Path) -> partition.Cutter:
    """What cuts this stack's network."""
    if isinstance(stack, stacks.LocalEndpoints):
        return LocalCutter(stack.stack)
    assert isinstance(stack, stacks.ComposeEndpoints)
    return ComposeCutter(stack.project, state_dir=run_dir)


# --- the verdict -----------------------------------------------------------------------------


@dataclass
class Expectation:
    """One thing the demonstration should have shown."""

    ok: bool
    text: str


def expect_available(demo: Demo) -> Expectation:
    rows = demo.windows["CUT inv"].rows
    answered = sum(r.catalogue.answered for r in rows)
    lags = [r.catalogue.lag for r in rows if r.catalogue.lag is not None]
    first, last = (lags[0], lags[-1]) if lags else (0.0, 0.0)
    grew = len(lags) >= 2 and last - first >= (len(rows) - 1) / 2
    return Expectation(
        answered == len(rows) and grew,
        f"during the cut the catalogue answered {answered}/{len(rows)} reads,"
        f" lag {first:.1f} -> {last:.1f} s",
    )


def expect_orders_accepted(demo: Demo) -> Expectation:
    rows = demo.windows["CUT inv"].rows
    accepted = (rows[-1].sent - rows[-1].shed) - (rows[0].sent - rows[0].shed)
    return Expectation(
        accepted > 0,
        f"during the cut {accepted} orders were accepted (201/202), {rows[-1].shed} shed so far",
    )


def expect_reservations_refused(demo: Demo) -> Expectation:
    before, end = demo.at_cut, demo.windows["CUT inv"].rows[-1].sagas
    faults, made = end.faults - before.faults, end.reserved - before.reserved
    return Expectation(
        faults > 0,
        f"during the cut reserve_stock failed {faults} attempts (inventory unreachable),"
        f" {made} reservations made, {end.gave_up} sagas gave up and compensated",
    )


def expect_converged(demo: Demo, took: float | None) -> Expectation:
    row = demo.windows["healed"].rows[-1] if "healed" in demo.windows else None
    lag = row.catalogue.lag if row and row.catalogue.lag is not None else float("nan")
    price = _money(row.catalogue.replica_price if row else None)
    if took is None:
        return Expectation(False, f"not converged within {demo.args.converge:.0f} s of the heal")
    return Expectation(
        True,
        f"converged {took:.0f} s after the heal: {demo.sku} at {price} in the replica,"
        f" lag {lag:.1f} s",
    )


def expect_lock_refused(demo: Demo) -> Expectation:
    rows = demo.windows["CUT etcd"].rows
    refused = sum(r.lock.startswith("refused") for r in rows)
    answered = sum(r.catalogue.answered for r in rows)
    return Expectation(
        refused > 0 and answered == len(rows),
        f"with etcd cut off the lock was refused in {refused}/{len(rows)} seconds,"
        f" the catalogue answered {answered}/{len(rows)} reads",
    )


# --- running it ------------------------------------------------------------------------------


async def run(args: argparse.Namespace, stack: stacks.Endpoints) -> int:
    databases = stacks.or_exit(lambda: stack.databases)
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    db = await asyncpg.connect(databases["order"], timeout=5)
    try:
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            demo = Demo(args, stack, http, db)
            demo.sku = await pick_sku(http, demo.order_url, args.seed)
            introduce(demo)
            took = await with_load(demo)
            expectations = [
                expect_available(demo),
                expect_orders_accepted(demo),
                expect_reservations_refused(demo),
                expect_converged(demo, took),
                expect_lock_refused(demo),
            ]
            expectations.extend(await dns_phase(stack))
            clean = await audited(databases, args.audit_timeout)
            await set_price(http, demo.inventory_url, demo.sku, demo.old_price, demo.token)
            print(f"(price of {demo.sku} set back to {demo.old_price:.2f})")
    finally:
        await db.close()
    return verdict(expectations, clean)


async def with_load(demo: Demo) -> float | None:
    """The story under steady load; the load stops after it, its answers awaited."""
    stop = asyncio.Event()
    args = demo.args
    async with asyncio.TaskGroup() as tg:
        tg.create_task(
            steady_load(
                demo.http, demo.order_url, demo.load, rate=args.rate, seed=args.seed, stop=stop
            )
        )
        try:
            return await demo.story()
        finally:
            stop.set()
            demo.say("load stopped; waiting for the last orders' answers")


async def dns_phase(stack: stacks.Endpoints) -> list[Expectation]:
    """Compose: DNS membership beside the watch-fed cache as an instance dies (none on the
    local stack, whose registry answers no DNS)."""
    if not isinstance(stack, stacks.ComposeEndpoints):
        print(f"\n{demo_dns.SKIPPED_LOCAL}")
        return []
    try:
        outcome = await demo_dns.phase(stack.refresh())
    except (stacks.StackError, subprocess.CalledProcessError) as exc:  # one line, no traceback
        return [Expectation(False, f"DNS phase: {exc}")]
    return [Expectation(outcome.ok, outcome.summary())]


async def pick_sku(http: httpx.AsyncClient, order_url: str, seed: int) -> str:
    """A product the replica knows, chosen with the seed; a replica still cold (a stack just
    started) is waited for, up to ``FILL_WAIT`` s."""
    ends = time.monotonic() + FILL_WAIT
    while True:
        catalogue = (await http.get(f"{order_url}/catalogue", timeout=5)).json()
        skus = sorted(p["sku"] for p in catalogue["products"])
        if catalogue["staleness"]["filled"] and skus:
            chosen: str = random.Random(seed).choice(skus)
            return chosen
        if time.monotonic() > ends:
            raise SystemExit(
                f"order's catalogue replica is still not filled after {FILL_WAIT:.0f} s:"
                " is inventory up? (make status)"
            )
        await asyncio.sleep(0.5)


def introduce(demo: Demo) -> None:
    args = demo.args
    print(
        f"ordermesh demo-cap on the {demo.stack.kind} stack (order API {demo.order_url});"
        f" {args.rate:g} orders/s, seed {args.seed}; inventory cut from order and RabbitMQ"
        f" for {args.cut:g} s, then etcd from everyone for {args.etcd_cut:g} s"
    )
    print(LEGEND)
    print()
    print(HEADER.format(sku=demo.sku))


async def audited(databases: dict[str, str], within: float) -> bool:
    print(f"\nauditing (waits up to {within:.0f} s for every order to end)...", flush=True)
    started = time.monotonic()
    findings = await audit.audit(databases, within=within)
    print(audit.render(findings))
    print(f"(audited in {time.monotonic() - started:.1f} s)")
    return all(f.ok for f in findings)


def verdict(expectations: list[Expectation], clean: bool) -> int:
    expectations.append(
        Expectation(clean, "audit: every invariant intact" if clean else "audit: VIOLATED")
    )
    print()
    for e in expectations:
        print(f"{'ok  ' if e.ok else 'FAIL'}  {e.text}")
    return 0 if all(e.ok for e in expectations) else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo-cap",
        description="CAP on the running stack (local or compose), under steady load: inventory"
        " cut from order and from RabbitMQ (catalogue reads answered with a growing lag, orders"
        " accepted, reservations refused, a price changed at inventory), healed (the replica"
        " converges), then etcd cut from everyone (an etcd lock refused, catalogue reads still"
        " answered); on compose, a payment instance killed while the watch-fed registry and DNS"
        " (its TTL) are read side by side; then the audit, and the price is set back."
        " Needs root (iptables, cgroups). Exit 1 when an expectation or an invariant failed.",
    )
    stacks.add_target_arguments(parser)
    parser.add_argument("--seed", type=int, default=1, help="seed of the orders, SKU and price (1)")
    parser.add_argument("--rate", type=float, default=5.0, help="orders per second (default 5)")
    parser.add_argument("--steady", type=float, default=3, help="seconds before the cut (3)")
    parser.add_argument("--cut", type=float, default=10, help="seconds inventory is cut (10)")
    parser.add_argument("--etcd-cut", type=float, default=5, help="seconds etcd is cut (5)")
    parser.add_argument(
        "--converge", type=float, default=20, help="most seconds to wait after a heal (20)"
    )
    parser.add_argument(
        "--audit-timeout", type=float, default=30, help="seconds the audit waits for quiet (30)"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or min(args.steady, args.cut, args.etcd_cut, args.converge) < 2:
        parser.error("--rate must be positive; --steady, --cut, --etcd-cut, --converge >= 2")
    return args


def require_root() -> None:
    """One line naming the fix, before anything is touched."""
    if os.geteuid() != 0:
        raise SystemExit(NOT_ROOT)
    try:
        partition.require_privileges()
    except partition.PartitionError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    require_root()
    # The rows show every change; the registries' own log lines would break the table up.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    stack = stacks.find_or_exit(args.target, run_dir=args.run_dir)
    try:
        sys.exit(asyncio.run(run(args, stack)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
