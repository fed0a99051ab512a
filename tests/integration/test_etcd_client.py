"""EtcdClient against real etcd processes (see tests/support/etcd.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from ordermesh_shared.etcd_client import (
    Compare,
    EtcdClient,
    EtcdUnavailable,
    EventType,
    LeaseNotFound,
    NotLeader,
    Put,
    WaitTimeout,
    WatchBatch,
)

from tests.support.etcd import EtcdServer, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def etcd(shared_etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(shared_etcd.url) as client:
        yield client


async def next_batch(batches: AsyncIterator[WatchBatch]) -> WatchBatch:
    async with asyncio.timeout(3):
        return await anext(batches)


async def test_put_then_get_returns_value_and_revisions(etcd: EtcdClient, etcd_prefix: str) -> None:
    key = f"{etcd_prefix}greeting"
    first = await etcd.put(key, "hello")
    second = await etcd.put(key, b"\x00\xffbinary")

    kv = await etcd.get(key)

    assert kv is not None
    assert (kv.key, kv.value) == (key, b"\x00\xffbinary")
    assert (kv.create_revision, kv.mod_revision, kv.version) == (first, second, 2)
    assert kv.lease == 0


async def test_get_of_missing_key_is_none(etcd: EtcdClient, etcd_prefix: str) -> None:
    assert await etcd.get(f"{etcd_prefix}absent") is None


async def test_get_prefix_lists_only_keys_under_prefix(etcd: EtcdClient, etcd_prefix: str) -> None:
    await etcd.put(f"{etcd_prefix}a/1", "x")
    await etcd.put(f"{etcd_prefix}a/2", "y")
    last = await etcd.put(f"{etcd_prefix}b/1", "z")

    kvs, revision = await etcd.get_prefix(f"{etcd_prefix}a/")

    assert [(kv.key, kv.value) for kv in kvs] == [
        (f"{etcd_prefix}a/1", b"x"),
        (f"{etcd_prefix}a/2", b"y"),
    ]
    assert revision >= last


async def test_delete_removes_key_and_says_how_many(etcd: EtcdClient, etcd_prefix: str) -> None:
    await etcd.put(f"{etcd_prefix}k", "v")

    assert await etcd.delete(f"{etcd_prefix}k") == 1
    assert await etcd.delete(f"{etcd_prefix}k") == 0
    assert await etcd.get(f"{etcd_prefix}k") is None


async def test_txn_creates_key_only_if_absent(etcd: EtcdClient, etcd_prefix: str) -> None:
    key = f"{etcd_prefix}owner"
    absent = [Compare(key, "CREATE", "=", 0)]

    first = await etcd.txn(absent, success=[Put(key, "a")])
    second = await etcd.txn(absent, success=[Put(key, "b")], failure=[Put(f"{key}-lost", "b")])

    assert first.succeeded
    assert not second.succeeded
    kv = await etcd.get(key)
    assert kv is not None
    assert kv.value == b"a"
    assert await etcd.get(f"{key}-lost") is not None


async def test_revoking_a_lease_deletes_its_keys(etcd: EtcdClient, etcd_prefix: str) -> None:
    lease = await etcd.lease_grant(30)
    await etcd.put(f"{etcd_prefix}leased", "v", lease=lease)
    kv = await etcd.get(f"{etcd_prefix}leased")
    assert kv is not None
    assert kv.lease == lease

    await etcd.lease_revoke(lease)

    assert await etcd.get(f"{etcd_prefix}leased") is None


async def test_keepalive_renews_and_ttl_reports_remaining(etcd: EtcdClient) -> None:
    lease = await etcd.lease_grant(30)

    assert await etcd.lease_keepalive(lease) == 30
    assert 28 <= await etcd.lease_ttl(lease) <= 30
    await etcd.lease_revoke(lease)


async def test_gone_lease_raises_lease_not_found(etcd: EtcdClient, etcd_prefix: str) -> None:
    lease = await etcd.lease_grant(30)
    await etcd.lease_revoke(lease)

    with pytest.raises(LeaseNotFound):
        await etcd.lease_keepalive(lease)
    with pytest.raises(LeaseNotFound):
        await etcd.lease_ttl(lease)
    with pytest.raises(LeaseNotFound):
        await etcd.lease_revoke(lease)
    with pytest.raises(LeaseNotFound):
        await etcd.put(f"{etcd_prefix}k", "v", lease=lease)


async def test_lease_not_kept_alive_expires_with_its_keys(
    etcd: EtcdClient, etcd_prefix: str
) -> None:
    lease = await etcd.lease_grant(1)  # the minimum these test servers allow
    await etcd.put(f"{etcd_prefix}ephemeral", "v", lease=lease)

    async with asyncio.timeout(3):
        while True:  # expiry happens on etcd's clock: poll for it
            if await etcd.get(f"{etcd_prefix}ephemeral") is None:
                break
            await asyncio.sleep(0.1)
    with pytest.raises(LeaseNotFound):
        await etcd.lease_keepalive(lease)


async def test_watch_replays_from_start_revision_then_follows(
    etcd: EtcdClient, etcd_prefix: str
) -> None:
    start = await etcd.put(f"{etcd_prefix}a", "1")  # happened before the watch began
    watch = etcd.watch_prefix(etcd_prefix, start_revision=start, idle_timeout=3)
    async with contextlib.aclosing(watch) as batches:
        replayed = await next_batch(batches)
        await etcd.delete(f"{etcd_prefix}a")
        deleted = await next_batch(batches)

    assert replayed.revision == start
    assert [(e.type, e.kv.key, e.kv.value) for e in replayed.events] == [
        (EventType.PUT, f"{etcd_prefix}a", b"1")
    ]
    assert [(e.type, e.kv.key) for e in deleted.events] == [(EventType.DELETE, f"{etcd_prefix}a")]
    assert deleted.revision > start


async def test_watch_ignores_keys_outside_prefix(etcd: EtcdClient, etcd_prefix: str) -> None:
    start = await etcd.put(f"{etcd_prefix}outside", "x")
    watch = etcd.watch_prefix(f"{etcd_prefix}in/", start_revision=start, idle_timeout=3)
    async with contextlib.aclosing(watch) as batches:
        await etcd.put(f"{etcd_prefix}outside", "y")
        await etcd.put(f"{etcd_prefix}in/k", "z")
        batch = await next_batch(batches)

    assert [e.kv.key for e in batch.events] == [f"{etcd_prefix}in/k"]


async def test_quiet_watch_gives_up_after_idle_timeout(etcd: EtcdClient, etcd_prefix: str) -> None:
    _, revision = await etcd.get_prefix(etcd_prefix)
    watch = etcd.watch_prefix(etcd_prefix, start_revision=revision + 1, idle_timeout=0.3)

    with pytest.raises(WaitTimeout):
        async with contextlib.aclosing(watch) as batches:
            await anext(batches)


async def test_lock_is_exclusive_and_revision_fences(etcd: EtcdClient, etcd_prefix: str) -> None:
    name = f"{etcd_prefix}lock"
    first_lease, second_lease = await etcd.lease_grant(30), await etcd.lease_grant(30)
    first = await etcd.lock(name, lease=first_lease, timeout=3)

    with pytest.raises(WaitTimeout):
        await etcd.lock(name, lease=second_lease, timeout=0.3)
    await etcd.unlock(first.key)
    second = await etcd.lock(name, lease=second_lease, timeout=3)

    assert second.key != first.key
    assert second.revision > first.revision
    await etcd.unlock(second.key)
    await etcd.lease_revoke(first_lease)
    await etcd.lease_revoke(second_lease)


async def test_election_campaign_leader_proclaim_resign(etcd: EtcdClient, etcd_prefix: str) -> None:
    name = f"{etcd_prefix}election"
    lease_a, lease_b = await etcd.lease_grant(30), await etcd.lease_grant(30)
    assert await etcd.leader(name) is None

    leader_a = await etcd.campaign(name, lease=lease_a, value="a", timeout=3)
    await etcd.proclaim(leader_a, "a2")
    current = await etcd.leader(name)
    assert current is not None
    assert (current.key, current.value) == (leader_a.key, b"a2")

    campaign_b = asyncio.create_task(etcd.campaign(name, lease=lease_b, value="b", timeout=3))
    await asyncio.sleep(0.2)
    assert not campaign_b.done()  # b waits while a leads
    await etcd.resign(leader_a)
    leader_b = await campaign_b

    assert leader_b.lease == lease_b
    with pytest.raises(NotLeader):
        await etcd.proclaim(leader_a, "stale")
    await etcd.lease_revoke(lease_a)
    await etcd.lease_revoke(lease_b)


async def test_observe_reports_leader_changes(etcd: EtcdClient, etcd_prefix: str) -> None:
    name = f"{etcd_prefix}observed"
    lease = await etcd.lease_grant(30)
    leader = await etcd.campaign(name, lease=lease, value="v1", timeout=3)

    async with contextlib.aclosing(etcd.observe(name, idle_timeout=3)) as changes:
        assert (await anext(changes)).value == b"v1"
        await etcd.proclaim(leader, "v2")
        assert (await anext(changes)).value == b"v2"
    await etcd.lease_revoke(lease)


async def test_unreachable_etcd_fails_fast_with_url_in_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with EtcdClient(url, timeout=2) as etcd:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match=r"127\.0\.0\.1.*running"):
            await etcd.get("k")

    assert time.monotonic() - started < 1


async def test_paused_etcd_times_out_within_call_timeout(etcd_server: EtcdServer) -> None:
    async with EtcdClient(etcd_server.url, timeout=0.3) as etcd:
        await etcd.put("k", "v")
        etcd_server.pause()
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="did not answer"):
            await etcd.get("k")
        etcd_server.resume()

        assert time.monotonic() - started < 1
        assert await etcd.get("k") is not None  # the client is still usable afterwards


async def test_watch_raises_unavailable_when_etcd_dies(etcd_server: EtcdServer) -> None:
    async with EtcdClient(etcd_server.url) as etcd:
        revision = await etcd.put("/w/k", "v")
        watch = etcd.watch_prefix("/w/", start_revision=revision, idle_timeout=3)
        async with contextlib.aclosing(watch) as batches:
            await next_batch(batches)
            etcd_server.kill()
            with pytest.raises(EtcdUnavailable):
                await next_batch(batches)
