"""Migrations: applied once, recorded, race-free when replicas start together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ordermesh_shared.database import Database, MigrationSet, load_migrations

pytestmark = pytest.mark.integration


def write(directory: Path, name: str, sql: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(sql)


async def test_applied_once_and_recorded(fresh_database: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_things.sql", "CREATE TABLE things (id int PRIMARY KEY);")
    write(tmp_path, "0002_seed.sql", "INSERT INTO things VALUES (1), (2);")
    mset = MigrationSet("service", tmp_path)
    async with Database(fresh_database) as db:
        assert await db.migrate(mset) == {"service": [1, 2]}
        assert await db.migrate(mset) == {"service": []}
        async with db.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM things") == 2
            rows = await conn.fetch("SELECT component, version, name FROM schema_migrations")
    assert sorted(tuple(r) for r in rows) == [
        ("service", 1, "0001_things"),
        ("service", 2, "0002_seed"),
    ]


async def test_replicas_starting_together_do_not_race(fresh_database: str, tmp_path: Path) -> None:
    # pg_sleep widens the window: without the advisory lock both would run CREATE TABLE.
    write(tmp_path, "0001_slow.sql", "SELECT pg_sleep(0.3); CREATE TABLE slow (id int);")
    mset = MigrationSet("service", tmp_path)
    dbs = [Database(fresh_database) for _ in range(4)]
    for db in dbs:
        await db.__aenter__()
    try:
        results = await asyncio.gather(*(db.migrate(mset) for db in dbs))
    finally:
        for db in dbs:
            await db.__aexit__(None, None, None)
    assert sorted(r["service"] for r in results) == [[], [], [], [1]]


async def test_edited_migration_is_refused(fresh_database: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "CREATE TABLE a (id int);")
    async with Database(fresh_database) as db:
        await db.migrate(MigrationSet("service", tmp_path))
        write(tmp_path, "0001_a.sql", "CREATE TABLE a (id bigint);")
        with pytest.raises(ValueError, match="changed after it was applied"):
            await db.migrate(MigrationSet("service", tmp_path))


async def test_closing_a_gap_in_the_numbering_moves_the_records(
    fresh_database: str, tmp_path: Path
) -> None:
    # A database migrated when the files were numbered 0001, 0003, 0004 (with a gap), then
    # started with them renumbered 0001-0003 and a new 0004: nothing runs twice.
    old, new = tmp_path / "old", tmp_path / "new"
    sqls = ["CREATE TABLE a (id int);", "CREATE TABLE b (id int);", "CREATE TABLE c (id int);"]
    for number, title, sql in zip((1, 3, 4), "abc", sqls, strict=True):
        write(old, f"{number:04d}_{title}.sql", sql)
    for number, title, sql in zip((1, 2, 3), "abc", sqls, strict=True):
        write(new, f"{number:04d}_{title}.sql", sql)
    write(new, "0004_d.sql", "CREATE TABLE d (id int);")
    async with Database(fresh_database) as db:
        assert await db.migrate(MigrationSet("service", old)) == {"service": [1, 3, 4]}
        assert await db.migrate(MigrationSet("service", new)) == {"service": [4]}
        async with db.pool.acquire() as conn:
            rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
    assert [tuple(r) for r in rows] == [(1, "0001_a"), (2, "0002_b"), (3, "0003_c"), (4, "0004_d")]


def test_badly_named_file_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "init.sql", "SELECT 1;")
    with pytest.raises(ValueError, match=r"NNNN_lowercase_name\.sql"):
        load_migrations(tmp_path)


async def test_unreachable_server_raises_connection_error() -> None:
    async with Database("postgresql://postgres@127.0.0.1:1/x") as db:
        with pytest.raises(OSError, match="Connect call failed"):
            await db.migrate(MigrationSet("service", Path("/nonexistent")))


def test_the_project_numbers_its_migrations_without_gaps() -> None:
    root = Path(__file__).resolve().parents[2]
    directories = sorted({p.parent for p in root.glob("s*/**/migrations/*.sql")})
    assert len(directories) >= 6  # shared, saga and the four services
    for directory in directories:
        versions = [m.version for m in load_migrations(directory)]
        assert versions == list(range(1, len(versions) + 1)), directory
