"""Postgres for tests: a fresh database per test on the machine's server, dropped afterwards.

The server is the machine's (127.0.0.1:5432), reached as ``ORDERMESH_TEST_PG``: ``make test``
sets it from ``.run/local.env``, where ``deploy/local/prereqs.sh`` keeps the password of the
role ``ordermesh`` it creates (CREATEDB, not a superuser); by hand, ``set -a; . .run/local.env;
set +a`` first. Unset, it is ``postgres@127.0.0.1`` with no password, which only a server that
trusts local connections accepts. Each test gets its own database, so tests never see each
other's rows.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import asyncpg
import pytest

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_dsn() -> str:
    """DSN of a database we may CREATE/DROP databases from."""
    return os.environ.get("ORDERMESH_TEST_PG") or DEFAULT_ADMIN_DSN


def dsn_for(database: str) -> str:
    """The admin DSN pointed at another database on the same server."""
    base, _, _ = admin_dsn().rpartition("/")
    return f"{base}/{database}"


async def create_database(name: str) -> str:
    """Create ``name`` (dropping a leftover of the same name) and return its DSN."""
    conn = await asyncpg.connect(admin_dsn())
    try:
        await _drop_forcing(conn, name)
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_for(name)


async def database_for_the_stack(stack: AsyncExitStack, prefix: str) -> str:
    """A fresh database named ``<prefix>_<random>``, dropped when ``stack`` closes; its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    dsn = await create_database(name)
    stack.push_async_callback(drop_database, name)
    return dsn


async def drop_database(name: str) -> None:
    """Drop ``name``, disconnecting whoever still uses it."""
    conn = await asyncpg.connect(admin_dsn())
    try:
        await _drop_forcing(conn, name)
    finally:
        await conn.close()


async def _drop_forcing(conn: asyncpg.Connection, name: str) -> None:
    # The tests' role is not a superuser, and FORCE may not end an autovacuum worker that
    # happens to be visiting the database: it is done within moments, so try again.
    for _ in range(50):
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except asyncpg.InsufficientPrivilegeError:
            await asyncio.sleep(0.2)
        else:
            return
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def wait_for_lock_waiter(dsn: str, within: float = 5.0) -> None:
    """Until a session on ``dsn``'s database waits for a lock: proof that a statement is
    blocked (a row lock, say), where a sleep could only show it had not finished yet."""
    conn = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(within):
            # Polling on purpose: the waiter is another session (pg_stat_activity tells).
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ):
                await asyncio.sleep(0.01)
    finally:
        await conn.close()


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    """A DSN to an empty database of this test's own."""
    name = f"om_test_{uuid.uuid4().hex[:12]}"
    try:
        dsn = await create_database(name)
    except (OSError, asyncpg.PostgresError) as exc:
        where = admin_dsn().split("@")[-1]
        pytest.fail(f"Postgres at {where} is needed for this test ({exc}): run `make deps`")
    yield dsn
    await drop_database(name)
