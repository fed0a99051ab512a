"""The auditor's per-aggregate order check against the real timeline table: events applied
in batches (which share one transaction time) are judged by the order they were applied in."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from order.app import MIGRATIONS
from order.timeline import record_timeline_events
from ordermesh_deploy.audit import per_aggregate_order
from ordermesh_shared.database import Database, prepare_database
from ordermesh_shared.messaging.envelope import Event
from ordermesh_shared.saga import SAGA_MIGRATIONS

pytestmark = pytest.mark.integration

ORDER = uuid.uuid4()


@pytest.fixture
async def db(fresh_database: str) -> AsyncIterator[Database]:
    async with Database(fresh_database) as database:
        await prepare_database(database, MIGRATIONS, extra=(SAGA_MIGRATIONS,))
        yield database


def event(sequence: int, event_type: str) -> Event:
    # Event ids chosen so that sorting by id would put the later event first.
    return Event(
        id=f"{9 - sequence}-{uuid.uuid4()}",
        source="/ordermesh/inventory",
        type=f"ordermesh.inventory.{event_type}",
        service="inventory",
        event_type=event_type,
        aggregate_type="reservation",
        aggregate_id=str(ORDER),
        sequence=sequence,
        time=datetime.now(UTC),
        data={"order_id": str(ORDER)},
    )


async def test_events_applied_in_one_batch_keep_their_order(db: Database) -> None:
    async with db.pool.acquire() as conn, conn.transaction():
        await record_timeline_events(
            conn, [event(1, "stock_reserved"), event(2, "stock_committed")]
        )
    async with db.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(DISTINCT received_at) FROM order_timeline") == 1
        finding = await per_aggregate_order({"order": conn})
    assert finding.ok, finding.examples
    assert finding.checked == 1


async def test_an_event_applied_after_a_later_one_is_reported(db: Database) -> None:
    async with db.pool.acquire() as conn, conn.transaction():
        await record_timeline_events(
            conn, [event(2, "stock_committed"), event(1, "stock_reserved")]
        )
    async with db.pool.acquire() as conn:
        finding = await per_aggregate_order({"order": conn})
    assert not finding.ok
    assert finding.examples == [f"inventory/reservation/{ORDER}: 1 after 2"]
