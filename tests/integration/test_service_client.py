"""ServiceClient against real HTTP servers on loopback (and a real etcd registry).

In-process aiohttp servers count TCP connections and requests, so "failed without opening a
connection" is observed where it happens; uvicorn children are SIGKILLed for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
from aiohttp import web
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.discovery.etcd import EtcdRegistry
from ordermesh_shared.resilience import (
    CircuitOpen,
    ClientPolicy,
    DeadlineExceeded,
    RetryBudgetExhausted,
    ServiceClient,
    StaticInstances,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from ordermesh_shared.resilience.breaker import CLOSED, OPEN

from tests.support.etcd import EtcdServer
from tests.support.procs import ChildProcess, python_child

pytestmark = pytest.mark.integration

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """An aiohttp server on loopback whose answers the test scripts; counts what reaches it.

    >>> async with Upstream(answer) as server:
    ...     server.instance("pay-1"), server.connections, server.request_times
    """

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.request_times: list[float] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        handler = self._runner.server
        assert handler is not None

        def count_connection() -> asyncio.BaseProtocol:
            self.connections += 1
            return handler()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(count_connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def requests(self) -> int:
        return len(self.request_times)

    def instance(self, instance_id: str) -> ServiceInstance:
        return ServiceInstance("pay", instance_id, "127.0.0.1", self.port)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.request_times.append(time.monotonic())
        return await self.answer(request)


def answering(status: int, **headers: str) -> Answer:
    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.json_response({"detail": f"status {status}"}, status=status, headers=headers)

    return answer


def client_for(*upstreams: Upstream, **policy: float) -> ServiceClient:
    found = [u.instance(f"pay-{n}") for n, u in enumerate(upstreams)]
    settings: dict[str, float] = {
        "max_attempts": 4,
        "backoff": 0.01,
        "backoff_cap": 0.05,
        "breaker_failures": 1000,
        "budget_min_retries": 1000,
    }
    settings.update(policy)
    return ServiceClient(StaticInstances({"pay": found}), policy=ClientPolicy(**settings))  # type: ignore[arg-type]


# -- breaker ------------------------------------------------------------------------------


async def test_breaker_opens_fails_fast_admits_one_trial_and_recovers() -> None:
    healthy = False

    async def answer(_request: web.Request) -> web.StreamResponse:
        if not healthy:
            return web.json_response({}, status=503)
        await asyncio.sleep(0.2)  # keeps the half-open trial in flight while others arrive
        return web.json_response({"ok": True})

    async with Upstream(answer) as server:
        policy = {"max_attempts": 1, "breaker_failures": 3, "breaker_reset": 0.3}
        async with client_for(server, **policy) as clients:
            pay = clients.service("pay")
            for _ in range(3):
                with pytest.raises(UpstreamUnavailable):
                    await pay.get("/charges")
            assert pay.breaker_states() == {"pay-0": OPEN}

            # Open: every call fails at once, and nothing reaches the server, not even a SYN.
            connections, requests = server.connections, server.requests
            started = time.monotonic()
            for _ in range(20):
                with pytest.raises(CircuitOpen):
                    await pay.get("/charges")
            assert time.monotonic() - started < 0.1
            assert (server.connections, server.requests) == (connections, requests)

            # After the reset timeout: one trial goes through, the concurrent calls do not.
            await asyncio.sleep(0.35)
            healthy = True
            calls = [asyncio.create_task(pay.get("/charges")) for _ in range(10)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert sum(not isinstance(r, BaseException) for r in results) == 1
            assert sum(isinstance(r, CircuitOpen) for r in results) == 9
            assert server.requests == requests + 1
            assert pay.breaker_states() == {"pay-0": CLOSED}  # the trial succeeded
            assert (await pay.get("/charges")).json() == {"ok": True}

            # A failed trial opens it again for another reset timeout.
            healthy = False
            for _ in range(3):
                with pytest.raises(UpstreamUnavailable):
                    await pay.get("/charges")
            await asyncio.sleep(0.35)
            requests = server.requests
            with pytest.raises(UpstreamUnavailable):
                await pay.get("/charges")  # the trial, answered 503
            assert pay.breaker_states() == {"pay-0": OPEN}
            with pytest.raises(CircuitOpen):
                await pay.get("/charges")
            assert server.requests == requests + 1


# -- retries ------------------------------------------------------------------------------


async def test_4xx_is_not_retried() -> None:
    async with Upstream(answering(409)) as server, client_for(server) as clients:
        with pytest.raises(UpstreamRejected) as caught:
            await clients.pay.get("/charges/1")
    assert caught.value.status == 409
    assert caught.value.body == {"detail": "status 409"}
    assert server.requests == 1


async def test_503_is_retried_up_to_the_limit_with_growing_waits() -> None:
    policy = {"max_attempts": 4, "backoff": 0.05, "backoff_cap": 1.0}
    async with Upstream(answering(503)) as server, client_for(server, **policy) as clients:
        with pytest.raises(UpstreamUnavailable) as caught:
            await clients.pay.get("/charges")
    assert caught.value.status == 503
    assert server.requests == 4
    times = server.request_times
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Retry n (from 0) waits at most base * 2^n, plus the time to send.
    for n, gap in enumerate(gaps):
        assert gap <= 0.05 * 2**n + 0.05


async def test_retry_after_is_honoured() -> None:
    answers = [answering(429, **{"Retry-After": "1"}), answering(200)]

    async def answer(request: web.Request) -> web.StreamResponse:
        return await answers.pop(0)(request)

    async with Upstream(answer) as server, client_for(server) as clients:
        assert (await clients.pay.get("/charges")).status == 200
    first, second = server.request_times
    assert 0.95 <= second - first < 1.5


async def test_a_post_without_idempotency_key_is_not_retried_once_sent() -> None:
    async with Upstream(answering(503)) as server, client_for(server) as clients:
        with pytest.raises(UpstreamUnavailable):
            await clients.pay.post("/payments", json={"amount": "5.00"})
        assert server.requests == 1
        with pytest.raises(UpstreamUnavailable):
            await clients.pay.post("/payments", json={"amount": "5.00"}, idempotency_key="k1")
        assert server.requests == 1 + 4


async def test_the_budget_stops_retries_during_a_full_outage() -> None:
    async with Upstream(answering(503)) as first, Upstream(answering(503)) as second:
        policy = {"max_attempts": 5, "budget_min_retries": 3, "budget_ratio": 0.2}
        async with client_for(first, second, **policy) as clients:
            errors = []
            for _ in range(50):
                with pytest.raises(UpstreamUnavailable) as caught:
                    await clients.pay.get("/charges")
                errors.append(caught.value)
    assert 50 < first.requests + second.requests <= 50 + 3 + 10
    assert isinstance(errors[-1], RetryBudgetExhausted)


# -- deadlines ----------------------------------------------------------------------------

SERVE = """
import asyncio, sys
import uvicorn

async def serve(app, on_ready=None):
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    if on_ready is not None:
        await on_ready(port)
    print("ready", port, flush=True)
    await serving
"""

SLOW_CALLEE = (
    SERVE
    + """
from fastapi import FastAPI
from ordermesh_shared.resilience import DeadlineMiddleware

app = FastAPI()
app.add_middleware(DeadlineMiddleware)
work = {"started": 0, "done": 0, "cancelled": 0}

@app.post("/payments")
async def charge() -> dict[str, int]:
    work["started"] += 1
    try:
        await asyncio.sleep(1.0)
    except asyncio.CancelledError:
        work["cancelled"] += 1  # cut at the deadline: the side effect can no longer happen
        raise
    work["done"] += 1  # the side effect
    return work

@app.get("/work")
async def show() -> dict[str, int]:
    return work

asyncio.run(serve(app))
"""
)


@contextlib.contextmanager
def child(code: str, *args: str, log_path: Path) -> Iterator[ChildProcess]:
    with python_child(code, *args, log_path=log_path) as process:
        yield process


async def ready_port(process: ChildProcess) -> int:
    await process.wait_for_output("ready", timeout=30)
    found = re.search(r"ready (\d+)", process.output())
    assert found is not None, process.describe()
    return int(found.group(1))


async def test_a_300ms_deadline_over_a_1s_callee(tmp_path: Path) -> None:
    with child(SLOW_CALLEE, log_path=tmp_path / "callee.log") as callee:
        port = await ready_port(callee)
        found = StaticInstances({"pay": [ServiceInstance("pay", "pay-1", "127.0.0.1", port)]})
        async with ServiceClient(found) as clients:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await clients.pay.post("/payments", json={}, idempotency_key="k", timeout=0.3)
            took = time.monotonic() - started
            assert 0.29 <= took < 0.6
            async with asyncio.timeout(5):  # until the callee saw its work cancelled
                while (work := (await clients.pay.get("/work")).json())["cancelled"] == 0:
                    await asyncio.sleep(0.02)
    assert work == {"started": 1, "done": 0, "cancelled": 1}


# -- an instance dies ---------------------------------------------------------------------

REGISTERED_INSTANCE = (
    SERVE
    + """
from fastapi import FastAPI
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.discovery.etcd import EtcdRegistry

async def main(etcd_url, prefix, instance_id):
    app = FastAPI()

    @app.get("/echo")
    async def echo() -> dict[str, str]:
        return {"instance": instance_id}

    async with EtcdRegistry(etcd_url, ttl=1, prefix=prefix) as registry:
        async def register(port):
            await registry.register(ServiceInstance("echo", instance_id, "127.0.0.1", port))
        await serve(app, register)

asyncio.run(main(*sys.argv[1:]))
"""
)


class Stream:
    """Callers making idempotent calls back to back; collects answers and errors."""

    def __init__(self, clients: ServiceClient, *, workers: int = 4) -> None:
        self.clients = clients
        self.workers = workers
        self.served_by: list[str] = []
        self.errors: list[UpstreamError] = []

    async def run(self) -> None:
        await asyncio.gather(*(self._caller() for _ in range(self.workers)))

    async def _caller(self) -> None:
        while True:
            try:
                answer = await self.clients.echo.get("/echo")
                self.served_by.append(answer.json()["instance"])
            except UpstreamError as exc:
                self.errors.append(exc)
            await asyncio.sleep(0.002)


async def eventually(check: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.005)


async def test_a_killed_instance_costs_callers_nothing(
    shared_etcd: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        instances = [
            stack.enter_context(
                child(
                    REGISTERED_INSTANCE,
                    shared_etcd.url,
                    etcd_prefix,
                    f"echo-{n}",
                    log_path=tmp_path / f"echo-{n}.log",
                )
            )
            for n in range(3)
        ]
        for process in instances:
            await ready_port(process)
        policy = ClientPolicy(
            attempt_timeout=1.0,
            backoff=0.005,
            backoff_cap=0.02,
            breaker_failures=3,
            breaker_reset=0.5,
        )
        async with (
            EtcdRegistry(shared_etcd.url, ttl=1, prefix=etcd_prefix) as registry,
            ServiceClient(registry, policy=policy) as clients,
        ):
            await registry.watch("echo")
            await eventually(
                lambda: len(registry.instances("echo")) == 3, within=5, what="3 instances"
            )
            stream = Stream(clients)
            streaming = asyncio.create_task(stream.run())
            try:
                await eventually(
                    lambda: len(set(stream.served_by)) == 3, within=5, what="all 3 serve"
                )
                instances[0].kill()
                killed_at = len(stream.served_by)
                await eventually(
                    lambda: clients.echo.breaker_states().get("echo-0") == OPEN,
                    within=3,
                    what="the dead instance's breaker opens",
                )
                await eventually(
                    lambda: "echo-0" not in {i.instance_id for i in registry.instances("echo")},
                    within=5,
                    what="the registry drops the dead instance",
                )
                after_drop = len(stream.served_by)
                await eventually(
                    lambda: len(stream.served_by) > after_drop + 50, within=5, what="calls go on"
                )
            finally:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming
    assert stream.errors == []
    assert "echo-0" not in stream.served_by[killed_at + stream.workers :]
    assert set(stream.served_by[after_drop:]) == {"echo-1", "echo-2"}
    assert "echo-0" not in clients.echo.breaker_states()
