"""The one error hierarchy of service-to-service calls.

Every failure of a :class:`~ordermesh_shared.resilience.ServiceClient` call surfaces as one of
these; services never see aiohttp or httpx exceptions::

    UpstreamError                 base: something went wrong calling ``service``
    ├── UpstreamRejected          the callee answered 4xx: a business "no" (never retried;
    │                             ``status`` and ``body`` say why; 429 is the exception, below)
    ├── UpstreamUnavailable       no usable answer: connection refused or reset, a timeout,
    │   │                         a 5xx, or 429 still after the retries that were allowed;
    │   │                         ``status`` is the last HTTP status seen, if any
    │   ├── CircuitOpen           every instance's breaker is open: nothing was sent
    │   └── RetryBudgetExhausted  a retry was due, but the service's retry budget is spent
    └── DeadlineExceeded          the call's deadline (its own, or inherited from the request
                                  being served) passed before an answer came

Handling advice: ``UpstreamRejected`` is an answer (compensate, report to the user);
``UpstreamUnavailable`` and ``DeadlineExceeded`` are faults (retry later with the same
idempotency key, or fail the step). :func:`install_upstream_error_handlers` maps the ones a
route lets escape to 502/503/504 JSON.

    try:
        await clients.payment.post("/payments", json=charge, idempotency_key=key)
    except UpstreamRejected as exc:      # e.g. exc.status == 409, exc.body["detail"]
        ...
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class UpstreamError(Exception):
    """A call to ``service`` failed; the message says what happened and where."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.detail = message


class UpstreamRejected(UpstreamError):
    """The callee answered with a 4xx status: its answer, not a fault.

    ``body`` is the decoded JSON body when there is one, else the text.
    """

    def __init__(self, service: str, status: int, body: Any) -> None:
        super().__init__(service, f"rejected with {status}: {_short(body)}")
        self.status = status
        self.body = body


class UpstreamUnavailable(UpstreamError):
    """No usable answer after the attempts that were allowed (``status``: the last one seen)."""

    def __init__(self, service: str, message: str, *, status: int | None = None) -> None:
        super().__init__(service, message)
        self.status = status


class CircuitOpen(UpstreamUnavailable):
    """Every known instance has an open breaker: the call failed at once, nothing was sent."""


class RetryBudgetExhausted(UpstreamUnavailable):
    """The call failed and may have been retried, but retries to this service are over budget."""


class DeadlineExceeded(UpstreamError):
    """The deadline passed before the callee answered."""


def decode_body(body: bytes) -> Any:
    """The JSON of an error body when it is JSON, else its text (for messages and handlers)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace")


def _short(body: Any, limit: int = 200) -> str:
    text = body.get("detail", body) if isinstance(body, dict) else body
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}..."


def install_upstream_error_handlers(app: FastAPI) -> None:
    """Answer escaped upstream errors as JSON: 502 rejected, 503 unavailable, 504 deadline."""

    @app.exception_handler(UpstreamRejected)
    async def _rejected(_req: Request, exc: UpstreamRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "upstream_status": exc.status}, status_code=502)

    @app.exception_handler(UpstreamUnavailable)
    async def _unavailable(_req: Request, exc: UpstreamUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(_req: Request, exc: DeadlineExceeded) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=504)
