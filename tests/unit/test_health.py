"""Health aggregation: concurrent checks, each bounded by its own timeout."""

from __future__ import annotations

import asyncio
import time

from ordermesh_shared.health import Health


async def ok() -> None:
    return None


async def refuses() -> None:
    raise ConnectionRefusedError("connection refused")


async def hangs() -> None:
    await asyncio.sleep(60)


async def test_all_ok_is_ready() -> None:
    report = await Health({"database": ok, "rabbitmq": ok}).check()
    assert report.ready
    assert report.as_json() == {"status": "ok", "checks": {"database": "ok", "rabbitmq": "ok"}}


async def test_failure_text_names_the_error() -> None:
    report = await Health({"database": ok, "rabbitmq": refuses}).check()
    assert not report.ready
    assert report.checks == {
        "database": "ok",
        "rabbitmq": "ConnectionRefusedError: connection refused",
    }
    assert report.as_json()["status"] == "unavailable"


async def test_slow_checks_run_concurrently_and_time_out_separately() -> None:
    health = Health({"a": hangs, "b": hangs, "c": ok}, timeout=0.2)
    started = time.monotonic()
    report = await health.check()
    elapsed = time.monotonic() - started
    assert report.checks == {"a": "timed out after 0.2s", "b": "timed out after 0.2s", "c": "ok"}
    assert elapsed < 0.39  # two 0.2 s timeouts in parallel, not in series


async def test_details_never_decide_readiness() -> None:
    async def broken_detail() -> int:
        raise RuntimeError("lag query failed")

    health = Health({"db": ok})
    health.add_detail("outbox", broken_detail)
    report = await health.check()
    assert report.ready
    assert report.details == {"outbox": "unavailable: RuntimeError: lag query failed"}


async def test_an_advisory_check_is_reported_but_leaves_the_instance_ready() -> None:
    health = Health({"database": ok})
    health.add_check("rabbitmq", refuses, critical=False)
    report = await health.check()
    assert report.ready
    assert report.as_json() == {
        "status": "degraded",
        "checks": {"database": "ok", "rabbitmq": "ConnectionRefusedError: connection refused"},
    }
    health.add_check("database", refuses)
    assert not (await health.check()).ready
