"""Fault injection: admin token checks, and faults that apply from the very next request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from ordermesh_shared.faults import FaultInjectionMiddleware, Faults, fault_router
from pydantic import SecretStr

TOKEN = "s3cret-admin"
ADMIN = {"X-Admin-Token": TOKEN}


def build_app() -> FastAPI:
    app = FastAPI()
    faults = Faults()
    app.add_middleware(FaultInjectionMiddleware, faults=faults)
    app.include_router(fault_router(faults, admin_token=SecretStr(TOKEN)))

    @app.get("/customers")
    async def customers() -> list[str]:
        return ["alice"]

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> str:
        return "up 1"

    return app


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        yield client


async def inject(http: httpx.AsyncClient, **spec: Any) -> None:
    answer = await http.put("/admin/faults", json=spec, headers=ADMIN)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    ("method", "body"), [("GET", None), ("PUT", {"error_rate": 1.0}), ("DELETE", None)]
)
async def test_admin_routes_need_the_token(
    http: httpx.AsyncClient, method: str, body: dict[str, float] | None
) -> None:
    missing = await http.request(method, "/admin/faults", json=body)
    assert missing.status_code == 401
    assert "X-Admin-Token" in missing.json()["detail"]
    wrong = await http.request(method, "/admin/faults", json=body, headers={"X-Admin-Token": "x"})
    assert wrong.status_code == 403
    assert (await http.get("/customers")).status_code == 200  # nothing was injected


async def test_injected_errors_apply_to_the_next_request_and_clear_at_once(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.get("/customers")).status_code == 200
    await inject(http, error_rate=1.0)
    failed = await http.get("/customers")
    assert failed.status_code == 503
    assert failed.headers["X-Fault-Injected"] == "1"
    shown = await http.get("/admin/faults", headers=ADMIN)
    assert shown.json()["error_rate"] == 1.0
    cleared = await http.delete("/admin/faults", headers=ADMIN)
    assert cleared.json()["error_rate"] == 0.0
    assert (await http.get("/customers")).status_code == 200


async def test_health_metrics_and_admin_are_never_faulted(http: httpx.AsyncClient) -> None:
    await inject(http, status=500, latency_ms=5000)
    started = time.monotonic()
    assert (await http.get("/health/live")).status_code == 200
    assert (await http.get("/metrics")).status_code == 200
    assert (await http.get("/admin/faults", headers=ADMIN)).status_code == 200
    assert time.monotonic() - started < 1.0


async def test_a_seeded_error_rate_fails_a_repeatable_share(http: httpx.AsyncClient) -> None:
    async def run() -> list[int]:
        await inject(http, error_rate=0.5, error_status=502, seed=42)
        return [(await http.get("/customers")).status_code for _ in range(200)]

    first, second = await run(), await run()
    assert first == second
    assert set(first) == {200, 502}
    assert 70 < first.count(502) < 130


async def test_added_latency_and_forced_status(http: httpx.AsyncClient) -> None:
    await inject(http, latency_ms=150, status=500)
    started = time.monotonic()
    answer = await http.get("/customers")
    assert answer.status_code == 500
    assert time.monotonic() - started >= 0.15


async def test_a_hang_holds_requests_until_the_faults_change(http: httpx.AsyncClient) -> None:
    await inject(http, hang=True)
    held = asyncio.create_task(http.get("/customers"))
    await asyncio.sleep(0.1)
    assert not held.done()
    await http.delete("/admin/faults", headers=ADMIN)
    assert (await asyncio.wait_for(held, 2)).status_code == 200


@pytest.mark.parametrize(
    "spec", [{"error_rate": 1.5}, {"latency_ms": -1}, {"error_status": 200}, {"colour": "red"}]
)
async def test_nonsense_faults_are_refused(http: httpx.AsyncClient, spec: dict[str, Any]) -> None:
    answer = await http.put("/admin/faults", json=spec, headers=ADMIN)
    assert answer.status_code == 422


@pytest.mark.parametrize("status", [200, 204, 302, 399, 600])
async def test_an_injected_status_is_an_error_never_a_fake_success(
    http: httpx.AsyncClient, status: int
) -> None:
    """A forced 200 on a refund would fake money back; only 4xx/5xx can be injected."""
    answer = await http.put("/admin/faults", json={"status": status}, headers=ADMIN)
    assert answer.status_code == 422
    assert ["body", "status"] in [error["loc"] for error in answer.json()["detail"]]
    assert (await http.get("/admin/faults", headers=ADMIN)).json()["status"] is None
    assert (await http.get("/customers")).status_code == 200
