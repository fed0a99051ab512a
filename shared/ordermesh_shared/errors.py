"""HTTP error mapping shared by every service: JSON bodies, never a stack trace.

Domain code raises :class:`NotFound` / :class:`Conflict` / :class:`Unavailable`; the handlers
installed by :func:`install_error_handlers` turn them (and anything unexpected) into JSON.
"""

from __future__ import annotations

import uuid

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ordermesh_shared.database import DatabaseNotReady

log = structlog.get_logger(__name__)


class ServiceError(Exception):
    """A failure with an HTTP status, a message a person can act on and, for business
    rejections, a machine-readable ``reason`` (e.g. ``out_of_stock``) callers can branch on."""

    status_code = 500

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason

    def body(self) -> dict[str, str]:
        """The JSON error body."""
        return {"detail": self.detail} | ({"reason": self.reason} if self.reason else {})


class NotFound(ServiceError):
    """The named resource does not exist (404)."""

    status_code = 404


class Conflict(ServiceError):
    """The request clashes with the resource's state (409)."""

    status_code = 409


class Rejected(ServiceError):
    """A valid request the business rules refuse, e.g. insufficient funds (422)."""

    status_code = 422


class Unavailable(ServiceError):
    """A dependency is down; try again later (503)."""

    status_code = 503


def install_error_handlers(app: FastAPI) -> None:
    """JSON for domain errors, 503 for an unreachable database, 500 without internals."""

    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(DatabaseNotReady)
    async def _db_not_ready(_req: Request, exc: DatabaseNotReady) -> JSONResponse:
        return _unavailable(f"database unavailable: {exc}")

    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(OSError)
    async def _db_down(_req: Request, exc: Exception) -> JSONResponse:
        log.warning("database.unavailable", error=str(exc))
        return _unavailable("database unavailable, try again shortly")

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error("http.unhandled", error_id=error_id, path=req.url.path, exc_info=exc)
        return JSONResponse(
            {"detail": "internal error; the service log has the details", "error_id": error_id},
            status_code=500,
        )


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
