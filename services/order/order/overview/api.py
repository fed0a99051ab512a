"""The live overview: ``GET /admin/overview`` (JSON, admin token) and the page at ``/ui``.

The page is static (HTML, CSS and one hand-written script served from this package: no CDN,
no build step, works offline) and holds no data of its own: it polls the JSON with the
``X-Admin-Token`` the operator pasted once, kept in the tab's ``sessionStorage`` (gone when
the tab closes, never put in a URL).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from ordermesh_shared.admin import ADMIN_RESPONSES, RequireAdmin
from ordermesh_shared.bootstrap import Ctx, ServiceContext
from ordermesh_shared.errors import NotFound
from pydantic import BaseModel, Field

from order.overview.sagas import SagasView, read_sagas
from order.overview.system import (
    BreakersView,
    QueueView,
    ServiceView,
    bounded,
    read_breakers,
    read_queues,
    read_services,
)

overview_router = APIRouter()

# The page may load only what this service serves: no CDN, no inline script.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_ASSETS = {
    "overview.js": "text/javascript; charset=utf-8",
    "overview.css": "text/css; charset=utf-8",
}


class Overview(BaseModel):
    """Everything the page shows; each part ``unknown`` with a reason when it cannot be read."""

    generated_at: datetime
    instance: str = Field(description="The order instance that answered.")
    sagas: SagasView
    breakers: BreakersView
    services: list[ServiceView]
    queues: list[QueueView]


@overview_router.get(
    "/admin/overview",
    summary="Admin: sagas, breakers, instances, relay leaders, outbox and consumer lag.",
    tags=["admin"],
    dependencies=[RequireAdmin],
    responses=ADMIN_RESPONSES,
)
async def overview(
    ctx: Ctx,
    request: Request,
    recent: Annotated[int, Query(ge=1, le=100, description="How many recent sagas.")] = 20,
) -> Overview:
    sagas, services, queues = await asyncio.gather(
        _sagas(ctx, request, recent), read_services(ctx), read_queues(ctx)
    )
    return Overview(
        generated_at=datetime.now(UTC),
        instance=ctx.instance.instance_id,
        sagas=sagas,
        breakers=read_breakers(ctx.clients),
        services=services,
        queues=queues,
    )


async def _sagas(ctx: ServiceContext, request: Request, recent: int) -> SagasView:
    def retry_path(saga_id: uuid.UUID) -> str:
        return str(request.app.url_path_for("retry_order", order_id=str(saga_id)))

    async def read() -> SagasView:
        async with ctx.db.pool.acquire() as conn:
            return await read_sagas(conn, recent_limit=recent, retry_path=retry_path)

    return await bounded(
        read, what="sagas", unknown=lambda r: SagasView(status="unknown", reason=r)
    )


@overview_router.get("/ui", include_in_schema=False)
async def page() -> Response:
    headers = {"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-cache"}
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=headers)


@overview_router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"the overview page has no file {name!r}")
    return Response(_asset(name), media_type=media_type, headers={"Cache-Control": "no-cache"})


@cache
def _asset(name: str) -> bytes:
    """A file of ``order/overview/ui`` (read on first use, not at import)."""
    return (resources.files("order.overview") / "ui" / name).read_bytes()
