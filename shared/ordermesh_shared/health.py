"""Liveness and readiness: dependency checks run concurrently, each under its own timeout.

A check is an async callable that returns on success and raises with a readable message
on failure. ``/health/ready`` answers 503 unless every critical check passes; an advisory
check (``critical=False``: the broker, whose events wait in the outbox meanwhile) is reported
with its error and turns the status to ``degraded``, but the instance stays ready.

>>> health = Health({"database": db.ping, "rabbitmq": broker.ping}, timeout=1.0)
>>> report = await health.check()
>>> report.ready, report.checks   # (False, {"database": "ok", "rabbitmq": "connection refused"})
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

Check = Callable[[], Awaitable[None]]
OK = "ok"


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The outcome of one round of checks: ``checks`` maps name -> "ok" or the error text."""

    checks: dict[str, str]
    details: dict[str, Any]
    advisory: frozenset[str] = frozenset()  # checks that do not decide readiness

    @property
    def ready(self) -> bool:
        """True when every critical check passed."""
        return self.ready_without(())

    def ready_without(self, ignored: Iterable[str]) -> bool:
        """True when every critical check not in ``ignored`` passed."""
        skip = self.advisory.union(ignored)
        return all(v == OK for k, v in self.checks.items() if k not in skip)

    def as_json(self) -> dict[str, Any]:
        """The response body: ``{status, checks, details?}``."""
        degraded = any(v != OK for v in self.checks.values())
        body: dict[str, Any] = {
            "status": ("degraded" if degraded else "ok") if self.ready else "unavailable",
            "checks": self.checks,
        }
        if self.details:
            body["details"] = self.details
        return body


class Health:
    """A named set of checks plus optional detail providers (e.g. outbox lag)."""

    def __init__(self, checks: Mapping[str, Check] | None = None, *, timeout: float = 1.0) -> None:
        self._checks: dict[str, Check] = dict(checks or {})
        self._details: dict[str, Callable[[], Awaitable[Any]]] = {}
        self._advisory: set[str] = set()
        self.timeout = timeout

    def add_check(self, name: str, check: Check, *, critical: bool = True) -> None:
        """Add a dependency; later components (outbox relay, consumers) add theirs.

        ``critical=False``: reported, but its failure leaves the instance ready.
        """
        self._checks[name] = check
        if critical:
            self._advisory.discard(name)
        else:
            self._advisory.add(name)

    def add_detail(self, name: str, provider: Callable[[], Awaitable[Any]]) -> None:
        """Add informative data to the readiness body that does not decide readiness."""
        self._details[name] = provider

    async def check(self) -> HealthReport:
        """Run every check concurrently; a slow one costs at most ``timeout``."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(self._checks[n]) for n in names))
        details = {}
        for name, provider in self._details.items():
            try:
                async with asyncio.timeout(self.timeout):
                    details[name] = await provider()
            except Exception as exc:
                details[name] = f"unavailable: {_describe(exc)}"
        checks = dict(zip(names, results, strict=True))
        return HealthReport(checks, details, frozenset(self._advisory))

    async def _run(self, check: Check) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                await check()
        except TimeoutError:
            return f"timed out after {self.timeout:g}s"
        except Exception as exc:
            return _describe(exc)
        return OK


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def health_router() -> APIRouter:
    """``GET /health/live`` (the process answers) and ``GET /health/ready`` (dependencies).

    Made with the app; the checks are the running service's (``app.state.ctx.health``)."""
    router = APIRouter(prefix="/health", tags=["health"])

    @router.get("/live", summary="The process is up and serving HTTP.")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/ready",
        summary="Every dependency answers; 503 with the failing checks otherwise.",
        responses={503: {"description": "A dependency is failing; `checks` says which."}},
    )
    async def ready(request: Request) -> JSONResponse:
        health: Health = request.app.state.ctx.health
        report = await health.check()
        return JSONResponse(report.as_json(), status_code=200 if report.ready else 503)

    return router
