"""The service's own PostgreSQL database: an asyncpg pool and plain-SQL migrations.

The pool opens lazily, so a service starts (and reports "not ready") while its database is
down; :func:`prepare_database` retries migrations with backoff until they are applied.

>>> async with Database(settings.database_url) as db:
...     await db.migrate(SHARED_MIGRATIONS, MigrationSet("service", MIGRATIONS))
...     async with db.pool.acquire() as conn: ...
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeAlias, Union
from urllib.parse import parse_qs, urlsplit

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy
from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

from ordermesh_shared.relay_bell import RelayBell

log = structlog.get_logger(__name__)

# What store functions take: a bare connection or one borrowed from the pool.
DbConn: TypeAlias = Union[
    "asyncpg.Connection[asyncpg.Record]", "PoolConnectionProxy[asyncpg.Record]"
]

# Any constant shared by all replicas of a service serialises their migrations.
MIGRATION_LOCK_ID = 0x6F72_6465_726D_6573  # "ordermes"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class DatabaseNotReady(Exception):
    """The database is unreachable or its migrations are not yet applied."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One plain-SQL file, applied once and recorded in ``schema_migrations``."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """Detects a migration edited after it was applied somewhere."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class MigrationSet:
    """A directory of migrations and the component it belongs to (versions are per component).

    The shared library ships its own tables (outbox, inbox, fencing tokens) as component
    ``shared``; each service's own files are component ``service``.
    """

    component: str
    directory: Path


SHARED_MIGRATIONS = MigrationSet("shared", Path(__file__).resolve().parent / "migrations")


class Database:
    """An asyncpg pool owned by an ``async with`` block; no connection opens on entry.

    ``idle_in_transaction_timeout``: Postgres ends a transaction left idle this long. A
    process frozen mid-transaction (SIGSTOP, a VM stall) must not hold its row locks (say,
    the outbox rows a relay claimed, or a fencing row) for ever; it must outlast any wait
    inside one of our transactions (the relay's publish timeout, 5 s by default).
    """

    def __init__(
        self,
        dsn: str,
        *,
        max_size: int = 10,
        connect_timeout: float = 3.0,
        idle_in_transaction_timeout: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._idle_in_transaction_ms = int(idle_in_transaction_timeout * 1000)
        self._pool: asyncpg.Pool | None = None
        self.migrated = False
        self.migration_error: str | None = None  # a failure waiting cannot heal
        # Writers ring it after committing outbox events; the relay here (if it leads) wakes.
        self.bell = RelayBell()

    @property
    def idle_in_transaction_timeout(self) -> float:
        """Seconds Postgres lets one of this pool's transactions sit idle."""
        return self._idle_in_transaction_ms / 1000

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool; raises :class:`DatabaseNotReady` before migrations have run."""
        if self._pool is None or not self.migrated:
            raise DatabaseNotReady("database not ready: migrations not applied yet")
        return self._pool

    async def __aenter__(self) -> Database:
        # min_size=0: creating the pool opens nothing, so start-up never blocks on Postgres.
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=self._max_size,
            timeout=self._connect_timeout,
            command_timeout=10,
            max_inactive_connection_lifetime=60,
            reset=_keep_session,
            ssl=loopback_ssl(self.dsn),
            # Set once per connection rather than per transaction: no extra round trip.
            server_settings={
                "idle_in_transaction_session_timeout": str(self._idle_in_transaction_ms)
            },
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def ping(self) -> None:
        """Health check: a round trip, and the schema must be in place."""
        if self._pool is None:
            raise DatabaseNotReady("pool not open")
        async with self._pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        if self.migration_error is not None:
            raise DatabaseNotReady(f"migrations failed: {self.migration_error}")
        if not self.migrated:
            raise DatabaseNotReady("migrations pending")

    async def migrate(self, *sets: MigrationSet) -> dict[str, list[int]]:
        """Apply pending migrations of each set in order; returns the versions applied now."""
        assert self._pool is not None, "use Database inside 'async with'"
        applied = {}
        for mset in sets:
            applied[mset.component] = await apply_migrations(
                self._pool, load_migrations(mset.directory), component=mset.component
            )
        self.migrated = True
        return applied


async def _keep_session(_conn: asyncpg.Connection) -> None:
    # asyncpg still rolls back an open transaction and drops listeners on release. Its default
    # reset also runs four statements per release (unlock all, close all, unlisten, reset all)
    # for session state we never leave behind: advisory locks and set_config are
    # transaction-scoped here and LISTEN has its own connection. Measured: 5-10% of a saga's
    # service CPU.
    return None


def loopback_ssl(dsn: str) -> bool | None:
    """``False`` (no TLS) for a DSN on this machine that does not choose an ``sslmode``; else
    ``None``, asyncpg's own default (``prefer``: TLS whenever the server offers it).

    Loopback traffic never leaves the kernel (whoever could read it could read the processes'
    memory too), yet TLS costs both ends on every round trip: with Debian's ``ssl = on`` it
    was ~2-3% of each service's CPU plus the server's side. A DSN or ``PGSSLMODE`` that names
    a mode is obeyed as written; a DSN without a host is judged by ``PGHOST``, as asyncpg
    connects there.
    """
    if os.environ.get("PGSSLMODE"):
        return None
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    if "sslmode" in query or "ssl" in query:
        return None
    hosts = query.get("host") or [parts.hostname or os.environ.get("PGHOST", "")]
    named = [h for entry in hosts for h in entry.split(",")]
    return False if all(_is_local(host) for host in named) else None


def _is_local(host: str) -> bool:
    if host in ("", "localhost") or host.startswith("/"):  # "": asyncpg's default, a socket
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_migrations(directory: Path) -> list[Migration]:
    """Read ``NNNN_name.sql`` files in version order; anything else there is an error."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path} must be named NNNN_lowercase_name.sql")
        migrations.append(Migration(int(match[1]), path.stem, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version number in {directory}")
    return migrations


async def apply_migrations(
    pool: asyncpg.Pool, migrations: list[Migration], *, component: str = "service"
) -> list[int]:
    """Apply what is missing, all in one transaction under an advisory lock.

    The transaction-scoped advisory lock makes a second replica starting at the same moment
    wait, then see the first one's rows in ``schema_migrations`` and apply nothing.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   component text NOT NULL,
                   version integer NOT NULL,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (component, version))"""
        )
        done = await _recorded(conn, component)
        moves = renumbered(migrations, done)
        if moves:
            await _move_records(conn, component, moves)
            done = await _recorded(conn, component)
        _refuse_edited(migrations, {v: checksum for v, (_, checksum) in done.items()})
        pending = [m for m in migrations if m.version not in done]
        for migration in pending:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (component, version, name, checksum)"
                " VALUES ($1, $2, $3, $4)",
                component,
                migration.version,
                migration.name,
                migration.checksum,
            )
    return [m.version for m in pending]


async def _recorded(conn: DbConn, component: str) -> dict[int, tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT version, name, checksum FROM schema_migrations WHERE component = $1", component
    )
    return {r["version"]: (r["name"], r["checksum"]) for r in rows}


def _title(name: str) -> str:
    return name.split("_", 1)[1] if "_" in name else name


def renumbered(
    migrations: list[Migration], done: dict[int, tuple[str, str]]
) -> list[tuple[int, Migration]]:
    """(recorded version, file) for each file recorded under another number: same title and
    checksum. Closing gaps in the numbering then moves the records instead of applying the
    files again on a database that already has them."""
    by_content = {(_title(name), checksum): v for v, (name, checksum) in done.items()}
    moves = []
    for m in migrations:
        old = by_content.get((_title(m.name), m.checksum))
        if old is not None and old != m.version:
            moves.append((old, m))
    return moves


async def _move_records(conn: DbConn, component: str, moves: list[tuple[int, Migration]]) -> None:
    # Through negative versions first: a move may land on a number another move frees.
    await conn.execute(
        "UPDATE schema_migrations SET version = -version"
        " WHERE component = $1 AND version = ANY($2::int[])",
        component,
        [old for old, _ in moves],
    )
    for old, m in moves:
        await conn.execute(
            "UPDATE schema_migrations SET version = $3, name = $4"
            " WHERE component = $1 AND version = $2",
            component,
            -old,
            m.version,
            m.name,
        )
    log.info("migrations.renumbered", component=component, moves={o: m.version for o, m in moves})


def _refuse_edited(migrations: list[Migration], done: dict[int, str]) -> None:
    for m in migrations:
        if m.version in done and done[m.version] != m.checksum:
            raise ValueError(f"migration {m.name} changed after it was applied; add a new one")


# SQLSTATE classes of a server that is away or full: connection exception, insufficient
# resources (53300 "too many connections"), operator intervention (57P01 "terminating
# connection", 57P03 "starting up").
_OUTAGE_SQLSTATE_CLASSES = frozenset({"08", "53", "57"})
# Transaction rollback: a serialization failure or a deadlock; the same work again may pass.
_LOST_RACE_SQLSTATE_CLASS = "40"


def _sqlstate_class(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    return (sqlstate or "")[:2]


def is_database_outage(exc: BaseException) -> bool:
    """True when the database is unreachable, starting up, shutting down or out of
    connections (waiting may heal it), not that the statement was wrong."""
    if isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.InternalClientError):
        # OSError: refused, reset, timed out (TimeoutError is one); InterfaceError and
        # InternalClientError: a connection closed or left in a bad state by a cut.
        return True
    return _sqlstate_class(exc) in _OUTAGE_SQLSTATE_CLASSES


def is_transient_database_error(exc: BaseException) -> bool:
    """True when waiting and trying again may heal it: an outage, or a transaction that lost
    to another (serialization failure, deadlock). A broken migration or query will not."""
    return is_database_outage(exc) or _sqlstate_class(exc) == _LOST_RACE_SQLSTATE_CLASS


async def prepare_database(
    db: Database,
    migrations: Path,
    *,
    extra: Sequence[MigrationSet] = (),
    max_wait: float = 10.0,
) -> None:
    """Apply the shared, the extra and then the service's migrations, retrying while
    Postgres is down."""
    sets = (SHARED_MIGRATIONS, *extra, MigrationSet("service", migrations))
    retrying = AsyncRetrying(
        retry=retry_if_exception(is_transient_database_error),
        wait=wait_random_exponential(multiplier=0.2, max=max_wait),
        before_sleep=lambda rs: log.warning(
            "database.unreachable",
            attempt=rs.attempt_number,
            error=str(rs.outcome.exception()) if rs.outcome else "",
        ),
    )
    try:
        async for attempt in retrying:
            with attempt:
                applied = await db.migrate(*sets)
    except Exception as exc:
        # Readiness shows why, so an operator need not dig the reason out of the logs.
        db.migration_error = f"{type(exc).__name__}: {exc}"
        log.error("database.migration_failed", error=db.migration_error)
        raise
    log.info("database.migrated", applied=applied)
