"""The order service's composition root."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar, Literal

from fastapi import FastAPI
from ordermesh_shared.bootstrap import ServiceContext, ServiceSpec, Setup, create_service_app
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.messaging.consumer import ConsumerMetrics
from ordermesh_shared.saga import SAGA_MIGRATIONS, SagaEngine, SagaMetrics, SagaPolicy
from pydantic import Field

from order.api import router
from order.app_state import OrderRuntime, SagaAdmission
from order.catalogue import CATALOGUE_QUEUE, start_catalogue
from order.catalogue_api import catalogue_router
from order.clients import OrderClients
from order.overview import overview_router
from order.saga import place_order_saga
from order.timeline import TIMELINE_QUEUE, start_timeline, timeline_router

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class OrderSettings(ServiceSettings):
    """Order settings: the shared ones plus the saga's timing."""

    service_name: ClassVar[str] = "order"
    default_port: ClassVar[int] = 8000

    order_wait: float = Field(
        2.0, ge=0, le=30, description="Seconds POST /orders waits for the saga before a 202."
    )
    saga_deadline: float = Field(
        10.0, gt=0, le=300, description="Seconds a saga keeps retrying faults before compensating."
    )
    saga_step_timeout: float = Field(3.0, gt=0, le=60, description="Timeout of one step attempt.")
    saga_lease_ttl: float = Field(
        5.0, gt=0, le=120, description="Seconds before another instance takes over a saga."
    )
    catalogue_refresh: float = Field(
        0.5,
        gt=0,
        le=60,
        description=(
            "Seconds between refreshes of the instance's in-memory copy of the catalogue"
            " replica, which POST /orders quotes from."
        ),
    )
    timeline_consumer: Literal["inline", "off"] = Field(
        "inline",
        description=(
            "inline: this instance consumes the event stream into the timeline; off: a"
            " process of its own does (python -m order.timeline_worker), so the saga's event"
            " loop does not apply every event of the platform."
        ),
    )
    max_in_flight_sagas: int = Field(
        64,
        ge=1,
        le=100_000,
        description=(
            "Sagas one instance runs at once; beyond it POST /orders answers 429 with"
            " Retry-After (a replayed Idempotency-Key is still answered)."
        ),
    )


def _saga_setup(settings: OrderSettings) -> Setup:
    @asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[OrderRuntime]:
        definition = place_order_saga(
            OrderClients(ctx.clients), step_timeout=settings.saga_step_timeout
        )
        policy = SagaPolicy(
            forward_deadline=settings.saga_deadline, lease_ttl=settings.saga_lease_ttl
        )
        engine = SagaEngine(
            ctx.db,
            owner=settings.instance_id,
            definitions=[definition],
            policy=policy,
            tasks=ctx.tasks,  # its heartbeat and recovery loops show in readiness
            metrics=SagaMetrics(ctx.metrics.registry),  # served at /metrics
        )
        async with engine:
            admission = SagaAdmission(
                engine, limit=settings.max_in_flight_sagas, registry=ctx.metrics.registry
            )
            consumers = ConsumerMetrics(ctx.metrics.registry)  # one per registry
            if settings.timeline_consumer == "inline":
                start_timeline(ctx, consumers)
            catalogue = start_catalogue(ctx, consumers, refresh=settings.catalogue_refresh)
            # What the routes get through order_runtime (kept by the bootstrap).
            yield OrderRuntime(engine, definition, settings.order_wait, admission, catalogue)

    return setup


def order_spec(settings: OrderSettings) -> ServiceSpec:
    """What makes the order service: its API, its saga, its tables."""
    return ServiceSpec(
        name="order",
        title="Ordermesh order API",
        description=(
            "Place orders and follow them through the saga: reserve stock, charge payment,"
            " create the shipment; compensations in reverse when a step says no."
        ),
        migrations=MIGRATIONS,
        routers=[router, timeline_router, overview_router, catalogue_router],
        setup=_saga_setup(settings),
        extra_migrations=(SAGA_MIGRATIONS,),
        consumer_queues=(TIMELINE_QUEUE, CATALOGUE_QUEUE),  # their depth is on /metrics
    )


def create_app(settings: OrderSettings) -> FastAPI:
    """Build the order app (nothing opens until its lifespan starts)."""
    return create_service_app(order_spec(settings), settings)
