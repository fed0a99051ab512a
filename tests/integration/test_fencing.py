"""fence() on a real Postgres: stale tokens refused, equal ones accepted, writers serialised."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg
import pytest
from ordermesh_shared.coordination import StaleToken, current_token, fence
from ordermesh_shared.database import SHARED_MIGRATIONS, apply_migrations, load_migrations

from tests.support.postgres import wait_for_lock_waiter

pytestmark = pytest.mark.integration

LEDGER = (
    "CREATE TABLE ledger (id bigserial PRIMARY KEY, writer text NOT NULL, token bigint NOT NULL)"
)


@pytest.fixture
async def pool(fresh_database: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(fresh_database, min_size=1, max_size=25) as pool:
        await apply_migrations(
            pool, load_migrations(SHARED_MIGRATIONS.directory), component="shared"
        )
        await pool.execute(LEDGER)
        yield pool


async def fenced_write(pool: asyncpg.Pool, *, writer: str, token: int) -> None:
    """A write protected by fencing: the ledger row lands only if the token is current."""
    async with pool.acquire() as conn, conn.transaction():
        await fence(conn, resource="ledger", token=token)
        await conn.execute("INSERT INTO ledger (writer, token) VALUES ($1, $2)", writer, token)


async def ledger(pool: asyncpg.Pool) -> list[tuple[str, int]]:
    rows = await pool.fetch("SELECT writer, token FROM ledger ORDER BY id")
    return [(r["writer"], r["token"]) for r in rows]


async def test_newer_token_replaces_older_and_older_is_refused(pool: asyncpg.Pool) -> None:
    await fenced_write(pool, writer="old", token=5)
    await fenced_write(pool, writer="new", token=9)

    with pytest.raises(StaleToken) as refused:
        await fenced_write(pool, writer="old", token=5)

    assert (refused.value.resource, refused.value.token, refused.value.current) == ("ledger", 5, 9)
    assert "lost its lock or leadership" in str(refused.value)
    assert await ledger(pool) == [("old", 5), ("new", 9)]  # the refused write never landed


async def test_same_holder_writes_many_times_with_one_token(pool: asyncpg.Pool) -> None:
    for _ in range(3):
        await fenced_write(pool, writer="holder", token=7)

    assert await ledger(pool) == [("holder", 7)] * 3


async def test_resources_are_fenced_independently(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await fence(conn, resource="a", token=100)
        await fence(conn, resource="b", token=3)

    async with pool.acquire() as conn:
        assert await current_token(conn, resource="a") == 100
        assert await current_token(conn, resource="b") == 3
        assert await current_token(conn, resource="never-fenced") is None


async def test_rolled_back_transaction_leaves_no_token_behind(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await fence(conn, resource="ledger", token=50)
        await transaction.rollback()  # the write failed after the fence

    await fenced_write(pool, writer="earlier-holder", token=10)  # not fenced off by token 50
    assert await ledger(pool) == [("earlier-holder", 10)]


async def test_second_writer_waits_until_first_commits_then_is_refused(
    pool: asyncpg.Pool, fresh_database: str
) -> None:
    """The check holds until commit: a stale writer cannot pass it while a newer one writes."""
    async with pool.acquire() as conn, conn.transaction():
        await fence(conn, resource="ledger", token=9)
        stale = asyncio.create_task(fenced_write(pool, writer="stale", token=8))
        await wait_for_lock_waiter(fresh_database)  # blocked on the resource's row
        assert not stale.done()
        await conn.execute("INSERT INTO ledger (writer, token) VALUES ('new', 9)")

    with pytest.raises(StaleToken):
        await stale
    assert await ledger(pool) == [("new", 9)]


async def test_concurrent_writers_never_land_a_token_after_a_newer_one(pool: asyncpg.Pool) -> None:
    tokens = [t for t in range(1, 21) for _ in range(2)]  # each token used by two writers
    random.Random(4).shuffle(tokens)

    async def attempt(token: int) -> bool:
        try:
            await fenced_write(pool, writer=f"w{token}", token=token)
        except StaleToken:
            return False
        return True

    accepted = await asyncio.gather(*(attempt(t) for t in tokens))

    landed = [token for _, token in await ledger(pool)]
    refused = [token for token, ok in zip(tokens, accepted, strict=True) if not ok]
    assert landed == sorted(landed)  # in commit order, tokens never went backwards
    assert len(landed) == sum(accepted)
    assert landed.count(20) == 2  # the newest token always lands, both of its writes
    assert all(token < 20 for token in refused)
