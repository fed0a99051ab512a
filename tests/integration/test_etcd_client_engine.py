"""EtcdClient on the platform's HTTP engine (aiohttp): what a call costs its caller."""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from ordermesh_shared.etcd_client import EtcdClient

from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.integration

CALLS = 300
CONCURRENCY = 16


async def cpu_ms_per_call(call: Callable[[], Awaitable[object]]) -> float:
    """This process's CPU per call, CONCURRENCY calls at a time (after a warm-up)."""

    async def batch(calls: int) -> None:
        for _ in range(calls // CONCURRENCY):
            await asyncio.gather(*(call() for _ in range(CONCURRENCY)))

    await batch(CONCURRENCY * 4)
    started = time.process_time()
    await batch(CALLS)
    return (time.process_time() - started) * 1000 / CALLS


async def test_a_call_costs_about_what_a_bare_aiohttp_post_costs(
    shared_etcd: EtcdServer, etcd_prefix: str
) -> None:
    # The registry, leases, locks and elections all call etcd; on httpx each call cost its
    # caller 3.5x (one at a time) to 13x (16 at once) a bare aiohttp POST of the same bytes.
    key = f"{etcd_prefix}cpu"
    body = b'{"key": "%s"}' % base64.b64encode(key.encode())
    headers = {"Content-Type": "application/json"}
    async with EtcdClient(shared_etcd.url) as etcd, aiohttp.ClientSession() as session:
        await etcd.put(key, "x" * 64)

        async def raw() -> None:
            async with session.post(
                f"{shared_etcd.url}/v3/kv/range", data=body, headers=headers
            ) as r:
                await r.read()

        ratios = []
        for _ in range(3):  # interleaved, paired: a noisy neighbour hurts both alike
            ratios.append(await cpu_ms_per_call(lambda: etcd.get(key)) / await cpu_ms_per_call(raw))
    assert statistics.median(ratios) < 2.5, ratios
