"""The caller's deadline (``X-Deadline-Ms``) honoured by a real service app: the payment
service, its own migrations, real Postgres. A charge the caller stopped waiting for is not
made, so a retry with the same idempotency key finds nothing half done."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import httpx
import pytest
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings

from tests.support.apps import running, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture
async def payment(fresh_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running(PAYMENT, PaymentSettings(database_url=fresh_database)) as client:
        await wait_ready(client)
        yield client


def charge() -> dict[str, str]:
    return {"order_id": str(uuid.uuid4()), "customer_id": "carol", "amount": "100.00"}


def headers(deadline_ms: str) -> dict[str, str]:
    return {"Idempotency-Key": f"{uuid.uuid4()}:charge_payment", "X-Deadline-Ms": deadline_ms}


async def books(dsn: str) -> tuple[Decimal, int]:
    """carol's balance and the number of payments recorded."""
    conn = await asyncpg.connect(dsn)
    try:
        balance = await conn.fetchval("SELECT balance FROM customers WHERE id = 'carol'")
        return balance, await conn.fetchval("SELECT count(*) FROM payments")
    finally:
        await conn.close()


async def test_a_request_arriving_after_its_deadline_is_not_served(
    payment: httpx.AsyncClient, fresh_database: str
) -> None:
    before = await books(fresh_database)
    late = await payment.post("/payments", json=charge(), headers=headers("0"))
    assert late.status_code == 504
    assert "nothing was done" in late.json()["detail"]
    assert await books(fresh_database) == before


async def test_a_deadline_that_is_not_milliseconds_is_refused(
    payment: httpx.AsyncClient, fresh_database: str
) -> None:
    bad = await payment.post("/payments", json=charge(), headers=headers("soon"))
    assert bad.status_code == 400
    assert "X-Deadline-Ms" in bad.json()["detail"]


async def test_a_charge_outliving_the_deadline_is_cancelled_and_undone(
    payment: httpx.AsyncClient, fresh_database: str
) -> None:
    body, first = charge(), headers("300")
    blocker = await asyncpg.connect(fresh_database)
    try:
        # carol's row locked: the debit waits for it, past the caller's 300 ms.
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM customers WHERE id = 'carol' FOR UPDATE")
            started = time.monotonic()
            async with asyncio.timeout(3):  # without the deadline, the charge would wait on
                answer = await payment.post("/payments", json=body, headers=first)
            waited = time.monotonic() - started
    finally:
        await blocker.close()
    assert answer.status_code == 504
    assert "the work was cancelled" in answer.json()["detail"]
    assert 0.25 <= waited < 2.0
    assert await books(fresh_database) == (Decimal("500.00"), 0)
    # The same key again, with time to spare: the first attempt left nothing behind it.
    retry = await payment.post(
        "/payments", json=body, headers={"Idempotency-Key": first["Idempotency-Key"]}
    )
    assert (retry.status_code, retry.json()["status"]) == (201, "charged")
    assert await books(fresh_database) == (Decimal("400.00"), 1)
