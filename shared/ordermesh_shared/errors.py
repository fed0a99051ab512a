"""HTTP error mapping shared by every service: JSON bodies, never a stack trace.

Domain code raises :class:`NotFound` / :class:`Conflict` / :class:`Unavailable`; the handlers
installed by :func:`install_error_handlers` turn them (and anything unexpected) into JSON.
A database that is starting up, shutting down or unreachable (see :func:`database_outage`)
answers 503 with ``Retry-After``; a method the path does not take answers 405 with an ``Allow``
naming every method the path does take; :data:`SHARED_RESPONSES` documents what any route may
answer.
"""

from __future__ import annotations

import json
import uuid

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from ordermesh_shared.database import DatabaseNotReady, is_database_outage

log = structlog.get_logger(__name__)

RETRY_AFTER_SECONDS = 1
_DETAIL_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}
_PROBLEM_SCHEMA = {
    "type": "object",
    "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"},
        "type": {"type": "string"},
    },
    "required": ["loc", "msg", "type"],
}
_INVALID_SCHEMA = {
    "type": "object",
    "properties": {
        "detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": _PROBLEM_SCHEMA}]},
        "reason": {"type": "string"},
    },
    "required": ["detail"],
}
# Answers any route of any service may give (merged into every route's OpenAPI responses;
# a route's own description of a status wins).
SHARED_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {
        "description": (
            "The request cannot be read: a JSON body that is not UTF-8, or an `X-Deadline-Ms`"
            " that is not whole milliseconds."
        ),
        "content": {"application/json": {"schema": _DETAIL_SCHEMA}},
    },
    413: {
        "description": "The request body is larger than MAX_BODY_BYTES; it was not read.",
        "content": {"application/json": {"schema": _DETAIL_SCHEMA}},
    },
    422: {
        "description": (
            "Invalid input; `loc` names the field, parameter or header (text holding a NUL"
            " character or an unpaired surrogate is refused everywhere)."
        ),
        "content": {"application/json": {"schema": _INVALID_SCHEMA}},
    },
    431: {
        "description": "A request header is too long; `detail` names it.",
        "content": {"application/json": {"schema": _DETAIL_SCHEMA}},
    },
    503: {
        "description": (
            "A dependency (the database, or a service this one calls) is unavailable: retry"
            " after `Retry-After`."
        ),
        "headers": _RETRY_AFTER,
        "content": {"application/json": {"schema": _DETAIL_SCHEMA}},
    },
    504: {
        "description": (
            "The caller's `X-Deadline-Ms` passed: on arrival (nothing was done) or while"
            " serving (the work was cancelled)."
        ),
        "content": {"application/json": {"schema": _DETAIL_SCHEMA}},
    },
}


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


def database_outage(exc: BaseException) -> bool:
    """True when ``exc`` says the database is not there for us now (not ready, unreachable,
    starting up, shutting down or out of connections), not that the statement was wrong."""
    return isinstance(exc, DatabaseNotReady) or is_database_outage(exc)


def install_error_handlers(app: FastAPI) -> None:
    """JSON for domain errors, 503 for an unreachable database, 500 without internals."""

    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(HTTPException)
    async def _http_error(req: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return _method_not_allowed(req)
        return await http_exception_handler(req, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> Response:
        return _validation_failed(exc)

    @app.exception_handler(DatabaseNotReady)
    async def _db_not_ready(_req: Request, exc: DatabaseNotReady) -> JSONResponse:
        return _unavailable(f"database unavailable: {exc}")

    @app.exception_handler(asyncpg.PostgresError)
    @app.exception_handler(asyncpg.InterfaceError)
    @app.exception_handler(asyncpg.InternalClientError)
    @app.exception_handler(OSError)
    async def _db_down(req: Request, exc: Exception) -> JSONResponse:
        if not database_outage(exc):
            return _internal_error(req, exc)
        log.warning("database.unavailable", error_type=type(exc).__name__, error=str(exc))
        return _unavailable("database unavailable, try again shortly")

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        return _internal_error(req, exc)


def _method_not_allowed(req: Request) -> JSONResponse:
    # Starlette's Allow names the methods of the first route matching the path only, and
    # FastAPI makes one route per method: OPTIONS /orders said "Allow: POST" though GET
    # /orders exists. Every route of the path counts.
    allowed: set[str] = set()
    for route in req.app.router.routes:
        methods = getattr(route, "methods", None)
        if methods and route.matches(req.scope)[0] != Match.NONE:
            allowed |= methods
    headers = {"Allow": ", ".join(sorted(allowed))}
    return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers=headers)


def _validation_failed(exc: RequestValidationError) -> Response:
    # FastAPI's own handler echoes each bad input as UTF-8: bytes that are not UTF-8 or a lone
    # surrogate made the answer to a 422 a 500. Undecodable bytes are shown escaped, and
    # ensure_ascii writes any surrogate as an escape.
    detail = jsonable_encoder(exc.errors(), custom_encoder={bytes: _show_bytes})
    body = json.dumps({"detail": detail}, separators=(",", ":"))
    return Response(body, status_code=422, media_type="application/json")


def _show_bytes(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _internal_error(req: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    log.error("http.unhandled", error_id=error_id, path=req.url.path, exc_info=exc)
    return JSONResponse(
        {"detail": "internal error; the service log has the details", "error_id": error_id},
        status_code=500,
    )


def _unavailable(detail: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return JSONResponse({"detail": detail}, status_code=503, headers=headers)
