"""LeaseKeeper against a scripted etcd gateway (httpx MockTransport): when is a lease lost?"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest
from ordermesh_shared.coordination import CoordinationUnavailable, LeaseKeeper, Lock
from ordermesh_shared.etcd_client import EtcdClient

TTL = 0.5
Keepalive = Callable[[], Awaitable[httpx.Response]]


class ScriptedEtcd:
    """Grants lease 7; answers keepalives with ``keepalive`` (swap it to change behaviour)."""

    def __init__(self) -> None:
        self.keepalive: Keepalive = renewed
        self.calls: list[str] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if request.url.path == "/v3/lease/grant":
            return json_answer({"ID": "7", "TTL": "1"})
        if request.url.path == "/v3/lease/keepalive":
            return await self.keepalive()
        return json_answer({})

    def count(self, path: str) -> int:
        return sum(1 for call in self.calls if call == path)


def json_answer(body: dict[str, object]) -> httpx.Response:
    return httpx.Response(200, content=orjson.dumps(body))


async def renewed() -> httpx.Response:
    return json_answer({"result": {"ID": "7", "TTL": "1"}})


async def expired() -> httpx.Response:
    return json_answer({"result": {"ID": "7"}})  # etcd's answer for an expired lease: no TTL


async def hangs() -> httpx.Response:
    await asyncio.sleep(3600)  # etcd paused: the request never completes
    raise AssertionError("unreachable")


async def refused() -> httpx.Response:
    raise httpx.ConnectError("connection refused")


@pytest.fixture
def etcd() -> ScriptedEtcd:
    return ScriptedEtcd()


@pytest.fixture
async def client(etcd: ScriptedEtcd) -> AsyncIterator[EtcdClient]:
    transport = httpx.MockTransport(etcd.handle)
    async with EtcdClient("http://etcd.test", transport=transport) as client:
        yield client


async def time_until_lost(keeper: LeaseKeeper) -> float:
    started = time.monotonic()
    async with asyncio.timeout(5):
        await keeper.lost.wait()
    return time.monotonic() - started


async def test_lease_renewed_while_etcd_answers_is_never_lost(
    etcd: ScriptedEtcd, client: EtcdClient
) -> None:
    async with LeaseKeeper(client, ttl=TTL, what="test") as keeper:
        await asyncio.sleep(3 * TTL)
        assert not keeper.lost.is_set()
    assert etcd.count("/v3/lease/keepalive") >= 8  # every TTL/4
    assert etcd.count("/v3/lease/revoke") == 1  # released on exit


async def test_lease_etcd_reports_expired_is_lost_at_once(
    etcd: ScriptedEtcd, client: EtcdClient
) -> None:
    etcd.keepalive = expired
    async with LeaseKeeper(client, ttl=TTL, what="test") as keeper:
        waited = await time_until_lost(keeper)
    assert waited < TTL / 4 + 0.1  # the first renewal finds out
    assert "expired" in keeper.lost_reason


@pytest.mark.parametrize("failure", [hangs, refused], ids=["etcd-paused", "etcd-down"])
async def test_unconfirmed_renewals_lose_lease_before_ttl_runs_out(
    etcd: ScriptedEtcd, client: EtcdClient, failure: Keepalive
) -> None:
    async with LeaseKeeper(client, ttl=TTL, what="test") as keeper:
        etcd.keepalive = failure
        waited = await time_until_lost(keeper)
    # Lost 0.6 x TTL after the last confirmed renewal, at most TTL/4 before the failures began.
    assert 0.6 * TTL - TTL / 4 - 0.02 <= waited <= 0.6 * TTL + 0.1
    assert "no renewal confirmed" in keeper.lost_reason


async def test_failed_renewals_are_retried_but_not_in_a_hot_loop(
    etcd: ScriptedEtcd, client: EtcdClient
) -> None:
    etcd.keepalive = refused
    async with LeaseKeeper(client, ttl=TTL, what="test") as keeper:
        await time_until_lost(keeper)
        renewals = etcd.count("/v3/lease/keepalive")
        await asyncio.sleep(TTL)
        assert etcd.count("/v3/lease/keepalive") == renewals  # gave up once lost
    assert 2 <= renewals <= 10  # retried every TTL/10 until the deadline


async def test_unreachable_etcd_on_grant_says_what_to_check() -> None:
    async def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async with EtcdClient("http://etcd.test", transport=httpx.MockTransport(down)) as client:
        with pytest.raises(CoordinationUnavailable, match="check that it runs"):
            async with LeaseKeeper(client, ttl=TTL, what="lock 'jobs'"):
                pass


async def test_lease_lapsing_while_waiting_for_lock_is_replaced_by_a_fresh_one() -> None:
    """Nothing is held while waiting, so a lapsed lease (a starved process) is just renewed."""
    granted: list[int] = []

    async def gateway(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content or b"{}")
        if request.url.path == "/v3/lease/grant":
            granted.append(len(granted) + 1)
            return json_answer({"ID": str(granted[-1]), "TTL": "1"})
        if request.url.path == "/v3/lease/keepalive" and body["ID"] == "1":
            return await expired()
        if request.url.path == "/v3/lock/lock":
            if body["lease"] == "1":
                return await hangs()  # queued behind another holder
            return json_answer({"header": {"revision": "42"}, "key": "L2xvY2svMg=="})
        return json_answer({"result": {"TTL": "1"}})

    transport = httpx.MockTransport(gateway)
    async with (
        EtcdClient("http://etcd.test", transport=transport) as client,
        Lock(client, "/lock", ttl=TTL).hold(timeout=5) as held,
    ):
        assert (held.token, held.lease) == (42, 2)
        assert not held.lost.is_set()
    assert granted == [1, 2]
