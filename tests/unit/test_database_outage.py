"""Which database errors are an outage (503 with Retry-After) and which are a bug (500)."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from ordermesh_shared.database import DatabaseNotReady, prepare_database
from ordermesh_shared.errors import install_error_handlers

OUTAGES = [
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another process"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.InternalClientError("unexpected connection state"),
    ConnectionRefusedError(111, "Connect call failed"),
    TimeoutError(),  # the pool's connect timeout
    DatabaseNotReady("migrations pending"),
]


def _app_raising(exc: Exception) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return app


async def _get(app: FastAPI) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/boom")


@pytest.mark.parametrize("exc", OUTAGES, ids=lambda e: type(e).__name__)
async def test_an_outage_is_503_with_retry_after(exc: Exception) -> None:
    response = await _get(_app_raising(exc))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "database unavailable" in response.json()["detail"]


async def test_a_refused_statement_is_500_without_internals() -> None:
    exc = asyncpg.UniqueViolationError('duplicate key value violates unique constraint "pk"')
    response = await _get(_app_raising(exc))
    assert response.status_code == 500
    assert "duplicate" not in response.text
    assert set(response.json()) == {"detail", "error_id"}


class _BusyThenMigrated:
    """A Database whose first migrations meet a full server (every slot taken: seen when
    many services and test runs start at once), then go through."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.migration_error: str | None = None
        self.attempts = 0

    async def migrate(self, *_sets: object) -> dict[str, list[int]]:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        return {"service": [1]}


@pytest.mark.parametrize("exc", OUTAGES[:-1], ids=lambda e: type(e).__name__)
async def test_start_up_migrations_wait_out_every_outage(exc: Exception, tmp_path: Path) -> None:
    db = _BusyThenMigrated([exc, exc])
    await prepare_database(db, tmp_path, max_wait=0.01)  # type: ignore[arg-type]
    assert db.attempts == 3
    assert db.migration_error is None


async def test_a_broken_migration_is_not_retried(tmp_path: Path) -> None:
    db = _BusyThenMigrated([asyncpg.UndefinedTableError("relation does not exist")])
    with pytest.raises(asyncpg.UndefinedTableError):
        await prepare_database(db, tmp_path, max_wait=0.01)  # type: ignore[arg-type]
    assert db.attempts == 1
    assert db.migration_error is not None
