"""Fault injection: make one instance flaky, slow or dead on demand, and heal it again.

Every service mounts :func:`fault_router` (``/admin/faults``, guarded by ``X-Admin-Token``) and
:class:`FaultInjectionMiddleware`, which applies the current faults to every route except
``/health/*``, ``/metrics`` and ``/admin/*`` (so the instance stays registered, observable and
healable). Faults belong to the instance that was told, and apply from its next request.

    curl -X PUT localhost:8002/admin/faults -H "X-Admin-Token: $ADMIN_TOKEN" \\
         -H 'Content-Type: application/json' -d '{"error_rate": 0.5, "latency_ms": 200}'
    curl localhost:8002/admin/faults -H "X-Admin-Token: $ADMIN_TOKEN"        # current
    curl -X DELETE localhost:8002/admin/faults -H "X-Admin-Token: $ADMIN_TOKEN"  # heal

In order: ``hang`` holds the request until the faults change (or the caller's deadline
cancels it); ``latency_ms`` delays it; ``status`` answers every request with that status
(4xx/5xx only: a faked success would claim work never done, such as a refund);
``error_rate`` answers that fraction of requests with ``error_status``. ``seed`` makes the
error draws repeatable.
"""

from __future__ import annotations

import asyncio
import random
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from ordermesh_shared.admin import ADMIN_RESPONSES, ADMIN_TOKEN_HEADER, check_admin_token

EXEMPT_PREFIXES = ("/health/", "/metrics", "/admin/")


class FaultSpec(BaseModel):
    """The faults of one instance; all off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_rate: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of requests to fail.")
    error_status: int = Field(503, ge=400, le=599, description="Status of injected errors.")
    latency_ms: int = Field(0, ge=0, le=60_000, description="Delay added to every request.")
    hang: bool = Field(False, description="Hold requests until the faults change.")
    status: int | None = Field(
        None,
        ge=400,
        le=599,
        description="Answer every request with this error status (4xx/5xx only).",
    )
    seed: int | None = Field(None, description="Seed for the error draws (repeatable runs).")

    @property
    def active(self) -> bool:
        return bool(self.error_rate or self.latency_ms or self.hang or self.status)


class Faults:
    """The current faults of this instance, shared by the admin routes and the middleware.

    >>> faults = Faults()
    >>> faults.set(FaultSpec(error_rate=1.0))      # effective from the next request
    >>> faults.clear()                               # healthy again; hung requests resume
    """

    def __init__(self) -> None:
        self.spec = FaultSpec()
        self._rng = random.Random()
        self._changed = asyncio.Event()

    def set(self, spec: FaultSpec) -> None:
        """Replace the faults; requests held by ``hang`` are released into the new ones."""
        self.spec = spec
        self._rng = random.Random(spec.seed)
        self._changed.set()
        self._changed = asyncio.Event()  # a fresh one for the requests that hang from now on

    def clear(self) -> None:
        """No faults."""
        self.set(FaultSpec())

    async def hold(self) -> None:
        """Wait until the faults change (what ``hang`` does to a request)."""
        await self._changed.wait()

    def draw_error(self) -> bool:
        """Whether this request is one of the ``error_rate`` that fail."""
        rate = self.spec.error_rate
        return rate > 0 and self._rng.random() < rate


class FaultInjectionMiddleware:
    """ASGI middleware applying :class:`Faults` to every route but health, metrics and admin.

    >>> faults = Faults()
    >>> app.add_middleware(FaultInjectionMiddleware, faults=faults)
    >>> app.include_router(fault_router(faults, admin_token=settings.admin_token))
    """

    def __init__(self, app: ASGIApp, *, faults: Faults) -> None:
        self.app = app
        self.faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.faults.spec.active or _exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        status = await self._inject()
        if status is None:
            await self.app(scope, receive, send)
            return
        await _answer(send, status)

    async def _inject(self) -> int | None:
        """Apply the delays; the status to answer instead of running the app, if any."""
        spec = self.faults.spec
        if spec.hang:
            await self.faults.hold()
            spec = self.faults.spec  # released by a change: what applies now is the new spec
        if spec.latency_ms:
            await asyncio.sleep(spec.latency_ms / 1000)
        if spec.status is not None:
            return spec.status
        return spec.error_status if self.faults.draw_error() else None


def fault_router(faults: Faults, *, admin_token: SecretStr | None) -> APIRouter:
    """``GET/PUT/DELETE /admin/faults``, each requiring the admin token."""

    def require_admin(
        token: Annotated[str | None, Header(alias=ADMIN_TOKEN_HEADER)] = None,
    ) -> None:
        check_admin_token(token, admin_token)

    router = APIRouter(
        prefix="/admin/faults",
        tags=["admin"],
        dependencies=[Depends(require_admin)],
        responses=ADMIN_RESPONSES,
    )

    @router.get("", summary="Show this instance's injected faults.")
    async def show_faults() -> FaultSpec:
        return faults.spec

    @router.put("", summary="Replace this instance's injected faults.")
    async def set_faults(spec: FaultSpec) -> FaultSpec:
        faults.set(spec)
        return faults.spec

    @router.delete("", summary="Clear this instance's injected faults.")
    async def clear_faults() -> FaultSpec:
        faults.clear()
        return faults.spec

    return router


def _exempt(path: str) -> bool:
    return path.startswith(EXEMPT_PREFIXES) or path == "/health"


async def _answer(send: Send, status: int) -> None:
    body = orjson.dumps({"detail": f"injected fault: status {status}"})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-fault-injected", b"1"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
