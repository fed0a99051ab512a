"""Coordination demos: leader election that survives a killed leader, and a fenced lock.

    uv run python -m ordermesh_deploy.coordination_demo election   # make demo-election
    uv run python -m ordermesh_deploy.coordination_demo lock       # make demo-lock

``election``: contender processes campaign; the leader is SIGKILLed, again and again; each
time another contender must lead within TTL + 1 s. ``lock``: worker processes take turns
holding a lock and writing to a Postgres ledger with the lock's fencing token; one holder is
SIGSTOPped past its TTL, another takes over, and when the frozen one wakes up its write must
be rejected by fencing. Each demo prints a timestamped log, checks what it claims (against
etcd and the ledger, not against the log), and exits 1 if something did not happen.

Contenders and workers are this module again (hidden subcommands), reporting JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import asyncpg
import structlog
from ordermesh_shared.coordination import (
    CoordinationError,
    Election,
    HeldLock,
    Lock,
    StaleToken,
    Term,
    fence,
)
from ordermesh_shared.database import SHARED_MIGRATIONS, apply_migrations, load_migrations
from ordermesh_shared.etcd_client import EtcdClient

from ordermesh_deploy.etcd_process import PrivateEtcd

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"
LEDGER = """CREATE TABLE ledger (
    id bigserial PRIMARY KEY, worker text NOT NULL, token bigint NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp())"""
RESOURCE = "demo-ledger"
_FIRST_EVENT_WAIT = 20.0  # seconds for child processes to start and report


class DemoFailed(Exception):
    """What the demo set out to show did not happen (or could not be set up)."""


@dataclass(frozen=True)
class Event:
    """One JSON line reported by a child (or by the demo itself, or etcd's observer)."""

    t: float
    who: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def token(self) -> int:
        return int(self.data.get("token", 0))


def clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def describe(event: Event) -> str:
    """The human sentence for an event."""
    d, token = event.data, event.token
    texts = {
        "campaigning": f"campaigning (pid {d.get('pid')})",
        "leading": f"LEADS since {clock(d.get('since', event.t))} (token {token})",
        "stepped-down": f"stopped leading (token {token})",
        "etcd-leader": f"etcd says the leader is now {d.get('leader')}",
        "waiting": "waiting for the lock",
        "acquired": f"HOLDS the lock (token {token})",
        "wrote": f"write #{d.get('seq')} accepted (token {token})",
        "rejected": f"write #{d.get('seq')} REJECTED: token {token} < {d.get('current')} (fencing)",
        "lease-lost": f"notices its lease may lapse: held.lost is set (token {token})",
        "released": f"released the lock (token {token})",
        "error": f"error: {d.get('message')}",
        "exited": _exit_text(int(d.get("code", 0))),
    }
    return texts.get(event.kind, f"{event.kind} {d}")


def _exit_text(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited (code {code})"


def emit(kind: str, **data: Any) -> None:
    """Report an event to the demo (children only): one JSON line on stdout."""
    print(json.dumps({"t": time.time(), "kind": kind, **data}), flush=True)


# -- the stage: private etcd, child processes, the event log ----------------------------------


class Stage:
    """Runs a demo's processes and prints their events as a timestamped log."""

    def __init__(self, etcd_url: str | None, *, verbose: bool = False) -> None:
        self._etcd_url = etcd_url
        self.failed = verbose  # set by the demo: the children's own logs are then shown
        self._stack = contextlib.AsyncExitStack()
        self.workdir = Path()
        self.url = ""
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.history: list[Event] = []  # every event shown, in the order shown
        self._readers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self.workdir = Path(self._stack.enter_context(tempfile.TemporaryDirectory()))
        if self._etcd_url is None:
            etcd = await self._stack.enter_async_context(PrivateEtcd(self.workdir / "etcd"))
            self.url = etcd.url
            self.say(f"started a private etcd at {self.url}")
        else:
            self.url = self._etcd_url
            self.say(f"using etcd at {self.url}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            await self.stop_children()
            if self.failed or exc_type is not None:
                print(self.child_logs(), file=sys.stderr, flush=True)
        finally:
            await self._stack.aclose()

    def say(self, text: str, *, who: str = "demo", t: float | None = None) -> None:
        print(f"{clock(t or time.time())}  {who:<13} {text}", flush=True)

    async def spawn(self, who: str, *argv: str) -> None:
        cmd = [sys.executable, "-m", "ordermesh_deploy.coordination_demo", *argv, "--who", who]
        with (self.workdir / f"{who}.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=log
            )
        self.children[who] = process
        self._readers.append(asyncio.create_task(self._read(who, process), name=f"read {who}"))

    async def _read(self, who: str, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            with contextlib.suppress(ValueError, KeyError):
                raw = json.loads(line)
                self.events.put_nowait(Event(raw.pop("t"), who, raw.pop("kind"), raw))
        code = await process.wait()
        self.events.put_nowait(Event(time.time(), who, "exited", {"code": code}))

    def signal(self, who: str, sig: signal.Signals, why: str) -> float:
        self.say(f"{sig.name} {who} ({why})")
        self.children[who].send_signal(sig)
        return time.monotonic()

    async def expect(self, wanted: Callable[[Event], bool], *, within: float, what: str) -> Event:
        """Print events as they come until one is ``wanted``; DemoFailed after ``within`` s."""
        try:
            async with asyncio.timeout(within):
                while not wanted(event := await self.events.get()):
                    self.show(event)
        except TimeoutError:
            raise DemoFailed(f"{what} did not happen within {within:.1f} s") from None
        self.show(event)
        return event

    async def run_for(self, seconds: float) -> None:
        """Let things happen for a while, printing events."""
        with contextlib.suppress(DemoFailed):
            await self.expect(lambda _: False, within=seconds, what="")

    def show(self, event: Event) -> None:
        self.history.append(event)
        self.say(describe(event), who=event.who, t=event.t)

    async def stop_children(self) -> None:
        """SIGTERM (SIGCONT first, for frozen ones), then SIGKILL what is still running."""
        for process in self.children.values():
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        _, stuck = await asyncio.wait(self._readers, timeout=5) if self._readers else ((), ())
        for process in self.children.values():
            if process.returncode is None:
                process.kill()
        if stuck:
            await asyncio.wait(stuck)
        while not self.events.empty():
            self.show(self.events.get_nowait())

    def child_logs(self) -> str:
        """The end of each child's own log (stderr), for diagnosing a failed demo."""
        paths = sorted(self.workdir.glob("*.log"))
        return "\n".join(f"--- {path.name}\n{path.read_text()[-1500:]}" for path in paths)


# -- election demo ----------------------------------------------------------------------------


async def election_demo(args: argparse.Namespace) -> list[str]:
    """Kill the leader ``args.kills`` times; returns what went wrong (empty: all good)."""
    problems: list[str] = []
    name = f"/ordermesh-demo/election-{uuid.uuid4().hex[:8]}"
    async with Stage(args.etcd_url, verbose=args.verbose) as stage, EtcdClient(stage.url) as etcd:
        stage.say(f"election {name}, TTL {args.ttl} s, {args.contenders} contenders")
        observer = asyncio.create_task(_observe(Election(etcd, name, ttl=1, value=""), stage))
        try:
            for i in range(1, args.contenders + 1):
                await stage.spawn(f"contender-{i}", "_contender", *_common(stage, name, args))
            await stage.expect(_is("leading"), within=_FIRST_EVENT_WAIT, what="a leader")
            for _ in range(args.kills):
                await _kill_leader(stage, etcd, name, args.ttl, problems)
            await stage.run_for(0.5)
            problems += _check_terms(stage)
        finally:
            observer.cancel()
            await asyncio.wait([observer])
        stage.failed |= bool(problems)
    return problems


def _check_terms(stage: Stage) -> list[str]:
    """Print who led when, from the contenders' reports; two at once is a problem."""
    stage.say("who led when:")
    problems, leading = [], dict[str, Event]()
    for event in sorted(stage.history, key=lambda e: e.t):
        if event.kind == "leading":
            if leading:
                problems.append(f"{event.who} leads while {', '.join(leading)} still does")
            leading[event.who] = event
        elif event.kind in ("stepped-down", "exited") and event.who in leading:
            began = leading.pop(event.who)
            stage.say(f"  {event.who:<13} token {began.token:>3}: {_span(began, event.t)}")
    for who, began in leading.items():
        stage.say(f"  {who:<13} token {began.token:>3}: {_span(began, None)}")
    return problems


def _span(began: Event, ended: float | None) -> str:
    since = began.data.get("since", began.t)
    return f"{clock(since)} - {clock(ended) if ended else 'still leading'}"


async def _kill_leader(
    stage: Stage, etcd: EtcdClient, name: str, ttl: float, problems: list[str]
) -> None:
    await stage.run_for(1.0)
    # A leader may have stepped down on its own (renewals too slow): kill the one leading now.
    leader = _current_leader(stage) or await stage.expect(
        _is("leading"), within=ttl + 4, what="a leader"
    )
    killed = stage.signal(leader.who, signal.SIGKILL, f"the leader since {clock(leader.t)}")
    new = await stage.expect(
        lambda e: e.kind == "leading" and e.who != leader.who, within=ttl + 4, what="a takeover"
    )
    took, limit = time.monotonic() - killed, ttl + 1
    stage.say(f"{new.who} took over {took:.2f} s after the kill (limit: TTL + 1 s = {limit} s)")
    if took > limit:
        problems.append(f"{new.who} took over after {took:.2f} s, more than TTL + 1 s")
    in_etcd = await etcd.leader(name)
    if in_etcd is None or in_etcd.value.decode() != new.who:
        problems.append(f"{new.who} says it leads, but etcd says {in_etcd}")


def _current_leader(stage: Stage) -> Event | None:
    leading: dict[str, Event] = {}
    for event in stage.history:
        if event.kind == "leading":
            leading[event.who] = event
        elif event.kind in ("stepped-down", "exited"):
            leading.pop(event.who, None)
    return next(reversed(leading.values()), None)


async def _observe(election: Election, stage: Stage) -> None:
    async for leader in election.observe():
        stage.events.put_nowait(Event(time.time(), "etcd", "etcd-leader", {"leader": leader}))


async def contender(args: argparse.Namespace) -> None:
    async def lead(term: Term) -> None:
        emit("leading", token=term.token, since=term.since.timestamp())
        try:
            await asyncio.Event().wait()  # a real leader would do its work here
        finally:
            emit("stepped-down", token=term.token)

    async with EtcdClient(args.etcd_url) as etcd:
        emit("campaigning", pid=os.getpid())
        await Election(etcd, args.name, ttl=args.ttl, value=args.who).run_while_leader(lead)


# -- lock demo --------------------------------------------------------------------------------


async def lock_demo(args: argparse.Namespace) -> list[str]:
    """Freeze a holder past its TTL; returns what went wrong (empty: all good)."""
    name = f"/ordermesh-demo/lock-{uuid.uuid4().hex[:8]}"
    async with (
        demo_database(args.database_url) as dsn,
        Stage(args.etcd_url, verbose=args.verbose) as stage,
    ):
        stage.say(f"lock {name}, TTL {args.ttl} s, {args.workers} workers, ledger in {dsn}")
        for i in range(1, args.workers + 1):
            worker_args = (*_common(stage, name, args), "--dsn", dsn)
            await stage.spawn(f"worker-{i}", "_worker", *worker_args)
        victim, rejected = await _freeze_a_holder(stage, args)
        await stage.run_for(args.ttl * 2)
        await stage.stop_children()
        problems = await _check_ledger(stage, dsn, victim, rejected)
        stage.failed |= bool(problems)
        return problems


async def _freeze_a_holder(stage: Stage, args: argparse.Namespace) -> tuple[Event, Event]:
    # Freeze a holder right after the first write of its turn: it has more writes to make.
    first = await stage.expect(
        lambda e: e.kind == "wrote" and e.data.get("seq") == 1,
        within=_FIRST_EVENT_WAIT,
        what="a first write",
    )
    who, token = first.who, first.token
    paused = stage.signal(who, signal.SIGSTOP, f"holds the lock, token {token}; for {args.pause} s")
    newer = await stage.expect(
        lambda e: e.kind == "wrote" and e.who != who and e.token > token,
        within=args.ttl + 4,
        what="a write by a new holder",
    )
    stage.say(f"{newer.who} took over {time.monotonic() - paused:.2f} s after the freeze")
    await stage.run_for(max(0.0, paused + args.pause - time.monotonic()))
    stage.signal(who, signal.SIGCONT, "it wakes up still believing it holds the lock")
    rejected = await stage.expect(
        lambda e: e.kind == "rejected" and e.who == who, within=5, what=f"{who}'s late write"
    )
    return first, rejected


async def _check_ledger(stage: Stage, dsn: str, victim: Event, rejected: Event) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT worker, token, written_at FROM ledger ORDER BY id")
    finally:
        await conn.close()
    _print_ledger(stage, rows)
    tokens = [int(r["token"]) for r in rows]
    problems = []
    if tokens != sorted(tokens):
        problems.append(f"the ledger has a write with an older token after a newer one: {tokens}")
    owners = {(r["token"], r["worker"]) for r in rows}
    if len(owners) != len(set(tokens)):
        problems.append("two workers wrote with the same token")
    if rejected.token != victim.token or rejected.data.get("current", 0) <= victim.token:
        problems.append(f"the rejected write was not the frozen holder's: {rejected}")
    return problems


def _print_ledger(stage: Stage, rows: list[asyncpg.Record]) -> None:
    stage.say(f"the ledger (Postgres) holds {len(rows)} writes, in commit order:")
    runs: list[list[asyncpg.Record]] = []
    for row in rows:
        if runs and runs[-1][0]["token"] == row["token"]:
            runs[-1].append(row)
        else:
            runs.append([row])
    for run in runs:
        first, last = (r["written_at"].timestamp() for r in (run[0], run[-1]))
        stage.say(
            f"  token {run[0]['token']:>4}: {len(run)} write(s) by {run[0]['worker']}, "
            f"{clock(first)}-{clock(last)}"
        )


@contextlib.asynccontextmanager
async def demo_database(admin_dsn: str) -> AsyncIterator[str]:
    """A throwaway database with the shared tables (fencing tokens) and the ledger."""
    name = f"ordermesh_demo_lock_{uuid.uuid4().hex[:8]}"
    try:
        admin = await asyncpg.connect(admin_dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise DemoFailed(
            f"cannot reach Postgres at {admin_dsn} ({exc}); start it or pass --database-url"
        ) from exc
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = urlsplit(admin_dsn)._replace(path=f"/{name}").geturl()
        async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
            shared = load_migrations(SHARED_MIGRATIONS.directory)
            await apply_migrations(pool, shared, component="shared")
            await pool.execute(LEDGER)
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def worker(args: argparse.Namespace) -> None:
    # A frozen worker must not keep the fencing row locked: Postgres ends its transaction.
    settings = {"idle_in_transaction_session_timeout": "1000"}
    async with (
        EtcdClient(args.etcd_url) as etcd,
        asyncpg.create_pool(args.dsn, min_size=1, max_size=2, server_settings=settings) as pool,
    ):
        lock = Lock(etcd, args.name, ttl=args.ttl)
        while True:
            await _take_a_turn(lock, pool, who=args.who, step=args.ttl / 4)
            await asyncio.sleep(args.ttl / 4)  # give the others a turn


async def _take_a_turn(lock: Lock, pool: asyncpg.Pool, *, who: str, step: float) -> None:
    emit("waiting")
    try:
        async with lock.hold(timeout=None) as held:
            emit("acquired", token=held.token)
            watch = asyncio.create_task(_report_lost(held))
            try:
                await _write_steps(pool, held, who=who, step=step)
            finally:
                watch.cancel()
                await asyncio.wait([watch])
        emit("released", token=held.token)
    except CoordinationError as exc:
        emit("error", message=str(exc))
        await asyncio.sleep(1)


async def _write_steps(pool: asyncpg.Pool, held: HeldLock, *, who: str, step: float) -> None:
    for seq in range(1, 5):
        # The "work" before each write. This worker deliberately does not check held.lost
        # right before writing: that check only narrows the window Jepsen describes; a
        # freeze can still land between check and write. Fencing closes the window.
        await asyncio.sleep(step)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await fence(conn, resource=RESOURCE, token=held.token)
                await conn.execute(
                    "INSERT INTO ledger (worker, token) VALUES ($1, $2)", who, held.token
                )
        except StaleToken as exc:
            emit("rejected", seq=seq, token=held.token, current=exc.current)
            return  # a newer holder exists: stop, and queue for the lock again
        emit("wrote", seq=seq, token=held.token)


async def _report_lost(held: HeldLock) -> None:
    await held.lost.wait()
    emit("lease-lost", token=held.token)


# -- command line -----------------------------------------------------------------------------


def _common(stage: Stage, name: str, args: argparse.Namespace) -> tuple[str, ...]:
    return ("--etcd-url", stage.url, "--name", name, "--ttl", str(args.ttl))


def _is(kind: str) -> Callable[[Event], bool]:
    return lambda event: event.kind == kind


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m ordermesh_deploy.coordination_demo",
        description="Show etcd leader election and a fenced distributed lock, with real processes.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="{election,lock}")
    election = commands.add_parser(
        "election", help="contenders campaign; the leader is killed; another takes over"
    )
    election.add_argument("--contenders", type=int, default=3, help="processes (default 3)")
    election.add_argument("--kills", type=int, default=2, help="leaders to kill (default 2)")
    lock = commands.add_parser(
        "lock", help="workers share a lock; a frozen holder's late write is fenced off"
    )
    lock.add_argument("--workers", type=int, default=3, help="processes (default 3)")
    lock.add_argument("--pause", type=float, help="seconds to freeze a holder (default TTL + 1.5)")
    lock.add_argument(
        "--database-url",
        default=f"{(os.environ.get('POSTGRES_URL') or DEFAULT_SERVER).rstrip('/')}/postgres",
        help="Postgres admin DSN: a throwaway database is created there, and dropped after "
        "(default: the server in env POSTGRES_URL, which make sets, else postgres@127.0.0.1)",
    )
    for sub in (election, lock):
        sub.add_argument("--etcd-url", help="use this etcd (default: start a private one)")
        sub.add_argument("--ttl", type=float, default=2.0, help="lease TTL in seconds (default 2)")
        sub.add_argument("--verbose", action="store_true", help="show the processes' own logs")
    for hidden in ("_contender", "_worker"):  # no help=: not listed
        child = commands.add_parser(hidden)
        for option in ("--etcd-url", "--name", "--who", "--dsn"):
            child.add_argument(option)
        child.add_argument("--ttl", type=float)
    return top


def _validate(args: argparse.Namespace, top: argparse.ArgumentParser) -> None:
    if args.ttl <= 0:
        top.error("--ttl must be positive")
    if args.command == "election" and not 0 < args.kills < args.contenders:
        top.error("--kills must be at least 1 and fewer than --contenders")
    if args.command == "lock":
        args.pause = args.ttl + 1.5 if args.pause is None else args.pause
        if args.workers < 2 or args.pause <= args.ttl:
            top.error("--workers must be at least 2 and --pause longer than --ttl")


_CLAIMS = {
    "election": "each killed leader was replaced within TTL + 1 s (etcd agreed on who leads), "
    "and never were two leaders at once",
    "lock": "the frozen holder's late write was rejected by fencing, and the ledger in Postgres "
    "never took a write with an older token after a newer one",
}
Demo = Callable[[argparse.Namespace], Coroutine[Any, Any, list[str]]]


async def _run_demo(demo: Demo, args: argparse.Namespace) -> int:
    try:
        problems = await demo(args)
    except DemoFailed as exc:
        problems = [str(exc)]
    for problem in problems:
        print(f"FAILED: {problem}", flush=True)
    if not problems:
        print(f"OK: {_CLAIMS[args.command]}", flush=True)
    return 1 if problems else 0


async def _child(main: Coroutine[Any, Any, None]) -> None:
    """Run a child's main until it ends or SIGTERM cancels it (releasing what it holds)."""
    task = asyncio.create_task(main)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _configure_logging(level: int) -> None:
    # Library logs go to stderr (children: their log file); stdout carries the demo's story.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command in ("_contender", "_worker"):
        _configure_logging(logging.INFO)
        asyncio.run(_child(contender(args) if args.command == "_contender" else worker(args)))
        return 0
    _validate(args, top)
    _configure_logging(logging.WARNING)
    demo = election_demo if args.command == "election" else lock_demo
    return asyncio.run(_run_demo(demo, args))


if __name__ == "__main__":
    sys.exit(main())
