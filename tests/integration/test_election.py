"""Election on real etcd and real processes: takeover, step-down, fencing of a paused leader."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from ordermesh_shared.coordination import CampaignTimeout, Election, Term
from ordermesh_shared.database import SHARED_MIGRATIONS, apply_migrations, load_migrations
from ordermesh_shared.etcd_client import EtcdClient

from tests.support.etcd import EtcdServer
from tests.support.procs import ChildProcess, python_child

pytestmark = pytest.mark.integration

TTL = 1.0  # etcd's minimum with the test servers' raft timings

CONTENDER = """
import asyncio, sys
from ordermesh_shared.coordination import Election
from ordermesh_shared.etcd_client import EtcdClient

async def lead(term):
    print(f"leading token={term.token}", flush=True)
    await asyncio.Event().wait()

async def main(url, name, me):
    async with EtcdClient(url) as etcd:
        print("campaigning", flush=True)
        await Election(etcd, name, ttl=1.0, value=me).run_while_leader(lead)

asyncio.run(main(*sys.argv[1:]))
"""

# A leader that writes to a fenced ledger. On SIGCONT it also replays, with the token it
# led with, the write that a process frozen mid-work would still make when it wakes up
# (Jepsen's paused lock holder): that write must be refused.
FENCED_CONTENDER = """
import asyncio, signal, sys
import asyncpg
from ordermesh_shared.coordination import Election, StaleToken, fence

from ordermesh_shared.etcd_client import EtcdClient

URL, NAME, ME, DSN = sys.argv[1:]
last_token = 0

async def write(conn, token, kind):
    try:
        async with conn.transaction():
            await fence(conn, resource="ledger", token=token)
            await conn.execute("INSERT INTO ledger (writer, token) VALUES ($1, $2)", ME, token)
    except StaleToken as exc:
        await conn.execute(
            "INSERT INTO refused (writer, token, kind) VALUES ($1, $2, $3)", ME, token, kind
        )
        print(f"{kind} write refused token={token} current={exc.current}", flush=True)
        raise

async def lead(term, pool):
    global last_token
    last_token = term.token
    print(f"leading token={term.token}", flush=True)
    try:
        while True:
            async with pool.acquire() as conn:
                await write(conn, term.token, "work")
            await asyncio.sleep(0.05)
    finally:
        print(f"stopped leading token={term.token}", flush=True)

async def replay_frozen_write():
    conn = await asyncpg.connect(DSN)
    try:
        await write(conn, last_token, "resumed")
        print("resumed write accepted", flush=True)
    except StaleToken:
        pass
    finally:
        await conn.close()

async def main():
    # A frozen writer must not keep the ledger's fencing row locked for long.
    settings = {"idle_in_transaction_session_timeout": "500"}
    replays = []
    resumed = lambda: replays.append(asyncio.ensure_future(replay_frozen_write()))
    asyncio.get_running_loop().add_signal_handler(signal.SIGCONT, resumed)
    async with EtcdClient(URL) as etcd, asyncpg.create_pool(DSN, server_settings=settings) as pool:
        print("campaigning", flush=True)
        election = Election(etcd, NAME, ttl=1.0, value=ME)
        await election.run_while_leader(lambda term: lead(term, pool))

asyncio.run(main())
"""

SCHEMA = """
CREATE TABLE ledger (id bigserial PRIMARY KEY, writer text NOT NULL, token bigint NOT NULL);
CREATE TABLE refused (id bigserial PRIMARY KEY, writer text NOT NULL, token bigint NOT NULL,
                      kind text NOT NULL);
"""


@pytest.fixture
async def etcd(shared_etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(shared_etcd.url) as client:
        yield client


@contextlib.contextmanager
def contenders(
    code: str, *args: str, count: int, tmp_path: Path
) -> Iterator[dict[str, ChildProcess]]:
    """``count`` contender processes named c0, c1...; all killed on the way out."""
    children = {
        f"c{i}": python_child(code, *args[:2], f"c{i}", *args[2:], log_path=tmp_path / f"c{i}.log")
        for i in range(count)
    }
    try:
        for child in children.values():
            child.start()
        yield children
    finally:
        for child in children.values():
            child.kill()


async def leader_other_than(etcd: EtcdClient, name: str, old: str | None, *, within: float) -> str:
    """Poll etcd until someone other than ``old`` leads ``name``; their value."""
    async with asyncio.timeout(within):
        while True:
            kv = await etcd.leader(name)
            if kv is not None and kv.value.decode() != old:
                return kv.value.decode()
            await asyncio.sleep(0.02)


async def poll_db(count: Callable[[], Awaitable[int]], *, within: float) -> None:
    """Wait until ``count()`` (a query) is non-zero."""
    async with asyncio.timeout(within):
        while not await count():
            await asyncio.sleep(0.02)


async def prepare_ledger(dsn: str) -> None:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
        shared = load_migrations(SHARED_MIGRATIONS.directory)
        await apply_migrations(pool, shared, component="shared")
        await pool.execute(SCHEMA)


def leaders(*elections: Election) -> list[str]:
    return [election.value for election in elections if election.is_leader]


async def until(predicate: Callable[[], bool], *, within: float) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_leader_is_known_and_resign_hands_over_at_once(
    etcd: EtcdClient, etcd_prefix: str
) -> None:
    name = f"{etcd_prefix}relay"
    a, b = (Election(etcd, name, ttl=TTL, value=v) for v in ("a", "b"))
    seen: list[str] = []

    async def watch() -> None:
        async for value in a.observe():
            seen.append(value)

    watcher = asyncio.create_task(watch())
    async with a.lead() as first:
        assert leaders(a, b) == ["a"]
        assert await b.leader() == "a"
        with pytest.raises(CampaignTimeout, match="someone else leads"):
            async with b.lead(timeout=0.3):
                pass
        async with contextlib.AsyncExitStack() as stack:
            second_term = asyncio.create_task(stack.enter_async_context(b.lead()))
            await asyncio.sleep(0.1)
            resigned = time.monotonic()
            await a.resign()
            second = await asyncio.wait_for(second_term, timeout=1)
            took = time.monotonic() - resigned

            assert first.lost.is_set()
            assert leaders(a, b) == ["b"]
            assert took < 0.5  # handed over, not left to expire
            assert second.token > first.token
            await until(lambda: seen[-1:] == ["b"], within=1)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert seen == ["a", "b"]


async def test_cancelled_run_while_leader_stops_work_and_hands_over(
    etcd: EtcdClient, etcd_prefix: str
) -> None:
    name, stopped = f"{etcd_prefix}relay", asyncio.Event()

    async def work(term: Term) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    a, b = (Election(etcd, name, ttl=TTL, value=v) for v in ("a", "b"))
    owner = asyncio.create_task(a.run_while_leader(work))
    await until(lambda: a.is_leader, within=2)
    async with contextlib.AsyncExitStack() as stack:
        b_term = asyncio.create_task(stack.enter_async_context(b.lead()))
        await asyncio.sleep(0.1)
        cancelled = time.monotonic()
        owner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await owner
        await asyncio.wait_for(b_term, timeout=TTL)
        took = time.monotonic() - cancelled

    assert stopped.is_set()
    assert took < 0.5  # a resigned on the way out rather than letting its lease expire


async def test_killed_leader_is_replaced_within_ttl_plus_one_second(
    shared_etcd: EtcdServer, etcd: EtcdClient, etcd_prefix: str, tmp_path: Path
) -> None:
    name = f"{etcd_prefix}relay"
    with contenders(CONTENDER, shared_etcd.url, name, count=3, tmp_path=tmp_path) as procs:
        old = await leader_other_than(etcd, name, None, within=15)
        await procs[old].wait_for_output("leading", timeout=5)

        procs[old].kill()
        killed = time.monotonic()
        new = await leader_other_than(etcd, name, old, within=TTL + 1)
        await procs[new].wait_for_output("leading", timeout=TTL + 1 - (time.monotonic() - killed))

    assert new != old


async def test_paused_leader_is_replaced_and_its_late_writes_are_fenced_off(
    shared_etcd: EtcdServer,
    etcd: EtcdClient,
    etcd_prefix: str,
    fresh_database: str,
    tmp_path: Path,
) -> None:
    await prepare_ledger(fresh_database)
    db = await asyncpg.connect(fresh_database)
    name = f"{etcd_prefix}relay"

    async def writes_by(writer: str) -> int:
        return int(await db.fetchval("SELECT count(*) FROM ledger WHERE writer = $1", writer))

    try:
        args = (shared_etcd.url, name, fresh_database)
        with contenders(FENCED_CONTENDER, *args, count=3, tmp_path=tmp_path) as procs:
            old = await leader_other_than(etcd, name, None, within=15)
            await poll_db(lambda: writes_by(old), within=5)

            procs[old].pause()
            paused = time.monotonic()
            new = await leader_other_than(etcd, name, old, within=TTL + 1)
            await poll_db(lambda: writes_by(new), within=3)
            await asyncio.sleep(max(0.0, TTL + 0.5 - (time.monotonic() - paused)))
            procs[old].resume()

            await procs[old].wait_for_output("resumed write refused", timeout=5)
            await procs[old].wait_for_output("stopped leading", timeout=TTL)
            await asyncio.sleep(0.3)  # room for any other late write to (wrongly) land
        history = [
            (r["writer"], r["token"]) for r in await db.fetch("SELECT * FROM ledger ORDER BY id")
        ]
        refused = await db.fetch("SELECT writer, token, kind FROM refused")
    finally:
        await db.close()

    tokens = [token for _, token in history]
    assert tokens == sorted(tokens), f"a stale leader's write landed after a newer one: {history}"
    assert all(len({w for w, t in history if t == token}) == 1 for token in tokens)
    old_token = max(t for w, t in history if w == old)
    assert "resumed" in {
        r["kind"] for r in refused if r["writer"] == old and r["token"] == old_token
    }
    assert min(t for w, t in history if w == new) > old_token


async def test_leader_steps_down_when_etcd_dies_and_leads_again_after_restart(
    etcd_server: EtcdServer,
) -> None:
    terms: list[Term] = []
    stopped: list[float] = []

    async def work(term: Term) -> None:
        terms.append(term)
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(time.monotonic())

    async with EtcdClient(etcd_server.url) as etcd:
        election = Election(etcd, "/relay", ttl=TTL, value="me")
        owner = asyncio.create_task(election.run_while_leader(work))
        try:
            await until(lambda: bool(terms), within=3)
            etcd_server.kill()
            crashed = time.monotonic()
            await until(lambda: bool(stopped), within=TTL)
            assert not election.is_leader
            await asyncio.sleep(0.5)  # campaigns fail meanwhile, with backoff

            etcd_server.start()
            await until(lambda: len(terms) == 2, within=TTL + 4)
        finally:
            owner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await owner
    assert stopped[0] - crashed < TTL * 0.6 + 0.2  # stepped down before the lease could lapse
    assert terms[1].token > terms[0].token
