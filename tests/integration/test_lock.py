"""Lock against real etcd and real processes: exclusion, renewal, expiry, etcd outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from ordermesh_shared.coordination import CoordinationUnavailable, Lock, LockBusy, LockTimeout
from ordermesh_shared.etcd_client import EtcdClient

from tests.support.etcd import EtcdServer, free_port
from tests.support.procs import python_child

pytestmark = pytest.mark.integration

TTL = 1.0  # etcd's minimum with the test servers' raft timings
# etcd revokes expired leases in a loop that runs every 500 ms, so expiry can lag the TTL.
EXPIRY_LAG = 0.5

HOLDER = """
import asyncio, sys
from ordermesh_shared.coordination import Lock
from ordermesh_shared.etcd_client import EtcdClient

async def main(url, name):
    async with EtcdClient(url) as etcd:
        async with Lock(etcd, name, ttl=1.0).hold(timeout=10) as held:
            print(f"holding token={held.token}", flush=True)
            await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""

# Read, pause, write back: without mutual exclusion, concurrent increments get lost.
INCREMENTER = """
import asyncio, os, sys
import asyncpg
from ordermesh_shared.coordination import Lock
from ordermesh_shared.etcd_client import EtcdClient

async def main(url, name, dsn, times, go):
    conn = await asyncpg.connect(dsn)
    async with EtcdClient(url) as etcd:
        lock = Lock(etcd, name, ttl=2.0)
        print("ready", flush=True)
        while not os.path.exists(go):  # start together, so the increments really contend
            await asyncio.sleep(0.01)
        for _ in range(int(times)):
            async with lock.hold(timeout=20):
                value = await conn.fetchval("SELECT value FROM counter")
                await asyncio.sleep(0.005)
                await conn.execute("UPDATE counter SET value = $1", value + 1)
    await conn.close()
    print("done", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture
async def etcd(shared_etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(shared_etcd.url) as client:
        yield client


async def is_busy(lock: Lock) -> bool:
    try:
        async with lock.try_hold():
            return False
    except LockBusy:
        return True


async def test_next_holder_gets_larger_token_right_after_release(
    etcd: EtcdClient, etcd_prefix: str
) -> None:
    lock = Lock(etcd, f"{etcd_prefix}jobs", ttl=TTL)
    async with lock.hold() as first:
        assert await is_busy(lock)
    started = time.monotonic()
    async with lock.try_hold() as second:
        took = time.monotonic() - started

    assert took < 0.5  # released on exit, not left to expire
    assert second.token > first.token


async def test_try_hold_on_busy_lock_fails_at_once(etcd: EtcdClient, etcd_prefix: str) -> None:
    lock = Lock(etcd, f"{etcd_prefix}jobs", ttl=TTL)
    async with lock.hold():
        started = time.monotonic()
        with pytest.raises(LockBusy, match="held by someone else"):
            async with lock.try_hold():
                pass
        assert time.monotonic() - started < 0.5


async def test_hold_gives_up_after_its_timeout(etcd: EtcdClient, etcd_prefix: str) -> None:
    lock = Lock(etcd, f"{etcd_prefix}jobs", ttl=TTL)
    async with lock.hold():
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=r"after 0\.3 s"):
            async with lock.hold(timeout=0.3):
                pass
        assert 0.3 <= time.monotonic() - started < 1.0
    assert not await is_busy(lock)  # the abandoned wait left nothing behind


async def test_lock_held_for_three_ttls_stays_held(etcd: EtcdClient, etcd_prefix: str) -> None:
    lock = Lock(etcd, f"{etcd_prefix}jobs", ttl=TTL)
    async with lock.hold() as held:
        deadline = time.monotonic() + 3 * TTL
        while time.monotonic() < deadline:
            assert await is_busy(lock), "the lock lapsed while held: renewal failed"
            await asyncio.sleep(0.25)
        assert not held.lost.is_set()


async def test_killed_holder_frees_lock_within_ttl(
    shared_etcd: EtcdServer, etcd: EtcdClient, etcd_prefix: str, tmp_path: Path
) -> None:
    name = f"{etcd_prefix}jobs"
    with python_child(HOLDER, shared_etcd.url, name, log_path=tmp_path / "holder.log") as holder:
        await holder.wait_for_output("holding", timeout=10)
        holder.kill()
        killed = time.monotonic()
        async with Lock(etcd, name, ttl=TTL).hold(timeout=5) as held:
            freed_after = time.monotonic() - killed

    assert freed_after < TTL + EXPIRY_LAG + 0.3, f"lock free only {freed_after:.2f} s after kill"
    assert held.token > int(holder.output().split("token=")[1].split()[0])


async def test_five_processes_incrementing_under_lock_lose_no_update(
    shared_etcd: EtcdServer, fresh_database: str, etcd_prefix: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(fresh_database)
    await conn.execute("CREATE TABLE counter (value int NOT NULL); INSERT INTO counter VALUES (0)")
    go, times = tmp_path / "go", 10
    args = (shared_etcd.url, f"{etcd_prefix}counter", fresh_database, str(times), str(go))
    workers = [
        python_child(INCREMENTER, *args, log_path=tmp_path / f"worker{i}.log") for i in range(5)
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            await worker.wait_for_output("ready", timeout=15)
        go.touch()
        for worker in workers:
            await worker.wait_for_output("done", timeout=30)
        assert await conn.fetchval("SELECT value FROM counter") == 5 * times
    finally:
        for worker in workers:
            worker.kill()
        await conn.close()


async def test_holder_notices_etcd_crash_and_reacquires_after_restart(
    etcd_server: EtcdServer,
) -> None:
    async with EtcdClient(etcd_server.url) as etcd:
        lock = Lock(etcd, "/jobs", ttl=TTL)
        async with lock.hold() as before:
            etcd_server.kill()
            crashed = time.monotonic()
            async with asyncio.timeout(TTL):
                await before.lost.wait()
            noticed = time.monotonic() - crashed
        released = time.monotonic() - crashed
        with pytest.raises(CoordinationUnavailable, match="check that it runs"):
            async with lock.hold(timeout=1):
                pass

        etcd_server.start()
        # The old lease survives the restart (etcd extends leases on start); it lapses
        # within a TTL since nobody renews it, and then the lock is ours again.
        async with lock.hold(timeout=TTL + EXPIRY_LAG + 2) as after:
            assert after.token > before.token
    assert noticed < TTL * 0.6 + 0.2
    assert released < noticed + 0.5  # leaving the block did not hang on the dead etcd


async def test_holder_of_lock_on_paused_etcd_notices_and_leaves_promptly(
    etcd_server: EtcdServer,
) -> None:
    async with EtcdClient(etcd_server.url) as etcd:
        async with Lock(etcd, "/jobs", ttl=TTL).hold() as held:
            etcd_server.pause()
            paused = time.monotonic()
            async with asyncio.timeout(TTL):
                await held.lost.wait()
        left_after = time.monotonic() - paused
        etcd_server.resume()
    assert left_after < TTL * 0.6 + 1.5  # releasing is bounded (1 s) on a frozen etcd


async def test_unreachable_etcd_fails_fast_with_what_to_check() -> None:
    async with EtcdClient(f"http://127.0.0.1:{free_port()}") as etcd:
        started = time.monotonic()
        with pytest.raises(CoordinationUnavailable, match="ETCD_URL"):
            async with Lock(etcd, "/jobs", ttl=TTL).hold():
                pass
    assert time.monotonic() - started < 2.5
