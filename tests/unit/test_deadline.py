"""Deadlines: the middleware that honours X-Deadline-Ms, and the scope calls inherit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.resilience import (
    DEADLINE_HEADER,
    CircuitOpen,
    DeadlineExceeded,
    DeadlineMiddleware,
    HttpxEngine,
    ServiceClient,
    StaticInstances,
    UpstreamRejected,
    UpstreamUnavailable,
    deadline_scope,
    install_upstream_error_handlers,
    remaining,
)


class Callee:
    """An app with the middleware; records what its routes saw and did."""

    def __init__(self) -> None:
        self.calls = 0
        self.work_done = 0
        self.seen_remaining: list[float | None] = []
        self.downstream_budgets: list[int] = []
        self.app = FastAPI()
        self.app.add_middleware(DeadlineMiddleware)
        self.app.add_api_route("/quick", self.quick)
        self.app.add_api_route("/slow", self.slow, methods=["POST"])
        self.app.add_api_route("/fan-out", self.fan_out)

    async def quick(self) -> dict[str, bool]:
        self.calls += 1
        self.seen_remaining.append(remaining())
        return {"ok": True}

    async def slow(self) -> dict[str, bool]:
        self.calls += 1
        await asyncio.sleep(1.0)
        self.work_done += 1  # the side effect a caller that gave up must not cause
        return {"ok": True}

    async def fan_out(self) -> dict[str, bool]:
        def record(request: httpx.Request) -> httpx.Response:
            self.downstream_budgets.append(int(request.headers[DEADLINE_HEADER]))
            return httpx.Response(200)

        found = StaticInstances({"stock": [ServiceInstance("stock", "s-1", "10.0.0.9", 1)]})
        engine = HttpxEngine(transport=httpx.MockTransport(record))
        async with ServiceClient(found, engine=engine) as clients:
            await asyncio.sleep(0.1)
            await clients.stock.get("/levels")
        return {"ok": True}


@pytest.fixture
async def callee() -> AsyncIterator[tuple[Callee, httpx.AsyncClient]]:
    target = Callee()
    transport = httpx.ASGITransport(app=target.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://callee") as http:
        yield target, http


async def test_without_the_header_there_is_no_deadline(
    callee: tuple[Callee, httpx.AsyncClient],
) -> None:
    target, http = callee
    assert (await http.get("/quick")).status_code == 200
    assert target.seen_remaining == [None]


async def test_the_route_sees_what_is_left(callee: tuple[Callee, httpx.AsyncClient]) -> None:
    target, http = callee
    assert (await http.get("/quick", headers={DEADLINE_HEADER: "300"})).status_code == 200
    (left,) = target.seen_remaining
    assert left is not None
    assert 0.1 < left <= 0.3


@pytest.mark.parametrize("value", ["0", "-5"])
async def test_a_passed_deadline_is_answered_504_without_running_the_app(
    callee: tuple[Callee, httpx.AsyncClient], value: str
) -> None:
    target, http = callee
    answer = await http.get("/quick", headers={DEADLINE_HEADER: value})
    assert answer.status_code == 504
    assert "nothing was done" in answer.json()["detail"]
    assert target.calls == 0


async def test_a_malformed_header_is_a_400_naming_it(
    callee: tuple[Callee, httpx.AsyncClient],
) -> None:
    target, http = callee
    answer = await http.get("/quick", headers={DEADLINE_HEADER: "soon"})
    assert answer.status_code == 400
    assert DEADLINE_HEADER in answer.json()["detail"]
    assert target.calls == 0


async def test_work_still_running_at_the_deadline_is_cancelled(
    callee: tuple[Callee, httpx.AsyncClient],
) -> None:
    target, http = callee
    started = time.monotonic()
    answer = await http.post("/slow", headers={DEADLINE_HEADER: "200"})
    took = time.monotonic() - started
    assert answer.status_code == 504
    assert 0.19 < took < 0.6
    await asyncio.sleep(1.0)
    assert target.calls == 1
    assert target.work_done == 0


async def test_calls_made_while_serving_inherit_what_is_left(
    callee: tuple[Callee, httpx.AsyncClient],
) -> None:
    target, http = callee
    assert (await http.get("/fan-out", headers={DEADLINE_HEADER: "500"})).status_code == 200
    (budget,) = target.downstream_budgets
    assert 200 < budget <= 400  # 500 ms, less the 100+ ms spent before the call


def test_a_scope_never_extends_the_enclosing_deadline() -> None:
    assert remaining() is None
    with deadline_scope(0.2):
        with deadline_scope(5.0):
            left = remaining()
            assert left is not None
            assert left <= 0.2
        with deadline_scope(0.05):
            left = remaining()
            assert left is not None
            assert left <= 0.05
    assert remaining() is None


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (DeadlineExceeded("pay", "deadline passed"), 504),
        (UpstreamUnavailable("pay", "pay-1 answered 503", status=503), 503),
        (CircuitOpen("pay", "all 2 instance(s) have their breaker open"), 503),
        (UpstreamRejected("pay", 409, {"detail": "insufficient funds"}), 502),
    ],
)
async def test_an_escaped_upstream_error_becomes_json(error: Exception, status: int) -> None:
    app = FastAPI()
    install_upstream_error_handlers(app)

    @app.get("/orders")
    async def orders() -> None:
        raise error

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        answer = await http.get("/orders")
    assert answer.status_code == status
    assert answer.json()["detail"].startswith("pay: ")
