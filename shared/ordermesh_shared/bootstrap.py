"""One bootstrap for every service: the composition root shared by order, inventory, payment
and shipping.

:func:`create_service_app` builds the FastAPI app; its lifespan opens the database (lazily),
the RabbitMQ connection and the registry, migrates in the background, registers the instance
while it is ready, and on shutdown deregisters first and then closes everything it opened.

>>> spec = ServiceSpec(name="payment", title="Payment", migrations=MIGRATIONS, routers=[router])
>>> app = create_service_app(spec, PaymentSettings())
>>> run_service(lambda s: create_service_app(spec, s), PaymentSettings)   # python -m payment
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import structlog
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request

from ordermesh_shared.auth import ServiceTokens
from ordermesh_shared.config import ServiceSettings, load_settings
from ordermesh_shared.database import Database, MigrationSet, prepare_database
from ordermesh_shared.discovery import Registry, RegistryError, ServiceInstance
from ordermesh_shared.errors import SHARED_RESPONSES, install_error_handlers
from ordermesh_shared.faults import FaultInjectionMiddleware, Faults, fault_router
from ordermesh_shared.health import Health, health_router
from ordermesh_shared.inputs import BodyLimitMiddleware, refuse_unstorable_input
from ordermesh_shared.logging import configure_logging
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.messaging.monitor import QueueMonitor
from ordermesh_shared.metrics import Metrics, RequestMetricsMiddleware
from ordermesh_shared.outbox.wiring import OutboxSite, install_outbox, outbox_routers
from ordermesh_shared.resilience import (
    ClientPolicy,
    DeadlineMiddleware,
    ServiceClient,
    install_upstream_error_handlers,
)
from ordermesh_shared.resilience.transport import AiohttpEngine
from ordermesh_shared.retention import Pruner, retention_rules
from ordermesh_shared.tasks import BackgroundTasks
from ordermesh_shared.tracing import Tracing, tracing_from_settings

log = structlog.get_logger(__name__)

PRESENCE_INTERVAL = 1.0


@dataclass
class ServiceContext:
    """Everything the lifespan opened, handed to routes (``Ctx``) and service setup hooks."""

    settings: ServiceSettings
    instance: ServiceInstance
    metrics: Metrics
    health: Health
    db: Database
    broker: Broker
    registry: Registry
    tasks: BackgroundTasks
    clients: ServiceClient
    # What the service's own setup hook yielded (the order service: its saga runtime); its
    # routes read it through a typed dependency of their own.
    service_state: object = None


# A service's own start-up and shutdown, around its requests; what it yields is kept in
# ``ServiceContext.service_state``.
Setup = Callable[[ServiceContext], AbstractAsyncContextManager[object]]


@dataclass(frozen=True)
class ServiceSpec:
    """What makes one service different from the others."""

    name: str
    title: str
    migrations: Path
    routers: Sequence[APIRouter] = ()
    description: str = ""
    version: str = "0.1.0"
    setup: Setup | None = None
    # Tables of shared components this service opts into (e.g. the saga engine's).
    extra_migrations: Sequence[MigrationSet] = ()
    # Admin-protected fault injection (/admin/faults): every participant can be made flaky.
    fault_injection: bool = True
    # The queues this service's consumers read: their depth is exported (with the
    # dead-letter queue's) as messaging_queue_messages.
    consumer_queues: Sequence[str] = ()


async def get_context(request: Request) -> ServiceContext:
    """FastAPI dependency: the running service's context.

    ``async`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, and
    that hop cost ~15% of a participant's CPU per request (measured with py-spy).
    """
    ctx: ServiceContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ServiceContext, Depends(get_context)]


def make_registry(settings: ServiceSettings) -> Registry:
    """The configured discovery backend (imported lazily: each pulls its own client)."""
    if settings.registry == "consul":
        from ordermesh_shared.discovery.consul import ConsulRegistry

        return ConsulRegistry(settings.consul_url)
    if settings.registry == "dns":
        return _dns_registry(settings)
    from ordermesh_shared.discovery.etcd import EtcdRegistry

    return EtcdRegistry(settings.etcd_url, ttl=settings.registry_ttl)


def _dns_registry(settings: ServiceSettings) -> Registry:
    from ordermesh_shared.discovery.consul import ConsulRegistry
    from ordermesh_shared.discovery.dns import DnsRegistry

    registrar = ConsulRegistry(settings.consul_url) if settings.dns_register == "consul" else None
    return DnsRegistry(
        settings.dns_server,
        domain=settings.dns_domain,
        port_name=settings.dns_port_name,
        name_suffix=settings.dns_name_suffix,
        registrar=registrar,
    )


def create_service_app(
    spec: ServiceSpec,
    settings: ServiceSettings,
    *,
    registry_factory: Callable[[ServiceSettings], Registry] = make_registry,
    tracing: Tracing | None = None,
) -> FastAPI:
    """Build the app; nothing is opened until the lifespan starts.

    ``tracing``: where spans go (tests pass one with an in-memory exporter); by default as
    the settings' ``OTEL_*`` say, and nothing is instrumented when they name no exporter.
    """
    metrics = Metrics(service=spec.name)
    tracing = tracing or tracing_from_settings(settings, service=spec.name)
    app = FastAPI(
        title=spec.title,
        description=spec.description,
        version=spec.version,
        lifespan=_lifespan(spec, settings, metrics, registry_factory, tracing),
        # 431 for a long header, 422 for text Postgres cannot store, on every route.
        dependencies=[Depends(refuse_unstorable_input)],
        responses=SHARED_RESPONSES,
    )
    # Pure (a key and two caches): made with the app, so routes can check tokens from the start.
    app.state.service_tokens = ServiceTokens(settings.service_token_secret, service=spec.name)
    if spec.fault_injection:
        faults = Faults()
        app.add_middleware(FaultInjectionMiddleware, faults=faults)
        app.include_router(fault_router(faults, admin_token=settings.admin_token))
    # Added after (so outside) the faults: an injected hang still ends at the caller's deadline.
    app.add_middleware(DeadlineMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    install_upstream_error_handlers(app)
    app.add_route("/metrics", metrics.endpoint, include_in_schema=False)
    # Every route exists from here on (the OpenAPI document is complete before start-up);
    # what they use is opened by the lifespan and read from app.state.
    for router in [health_router(), *outbox_routers(), *spec.routers]:
        app.include_router(router)
    if tracing is not None:  # outermost: the server span covers every middleware
        tracing.instrument_app(app)
    return app


def _lifespan(
    spec: ServiceSpec,
    settings: ServiceSettings,
    metrics: Metrics,
    registry_factory: Callable[[ServiceSettings], Registry],
    tracing: Tracing | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if tracing is not None:  # entered first, so it flushes after everything stopped
                await stack.enter_async_context(tracing)
            ctx = await _open_context(
                stack, spec, settings, metrics, registry_factory, app.state.service_tokens, tracing
            )
            app.state.ctx = ctx
            ctx.tasks.start(
                prepare_database(ctx.db, spec.migrations, extra=spec.extra_migrations),
                name="migrate",
            )
            # Lag monitor, quarantine admin, relay (it waits for the migrations).
            app.state.relay_view = install_outbox(
                OutboxSite(
                    ctx.settings,
                    ctx.instance,
                    ctx.db,
                    ctx.broker,
                    ctx.tasks,
                    ctx.health,
                    ctx.metrics.registry,
                )
            )
            _monitor_queues(ctx, spec)
            if spec.setup is not None:
                ctx.service_state = await stack.enter_async_context(spec.setup(ctx))
            ctx.tasks.supervise(lambda: keep_registered(ctx), name="presence")
            # Inbox, idempotency keys, timeline, finished sagas' steps: each replica prunes.
            pruner = Pruner(
                ctx.db,
                retention_rules(settings),
                interval=settings.prune_interval,
                pruned=metrics.pruned_rows,
            )
            ctx.tasks.supervise(pruner.run, name="retention")
            _warn_without_admin_token(settings)
            log.info("service.started", port=settings.port, registry=settings.registry)
            yield
            log.info("service.stopping")

    return lifespan


async def _open_context(
    stack: AsyncExitStack,
    spec: ServiceSpec,
    settings: ServiceSettings,
    metrics: Metrics,
    registry_factory: Callable[[ServiceSettings], Registry],
    tokens: ServiceTokens,
    tracing: Tracing | None,
) -> ServiceContext:
    # Exit order is the reverse: background tasks (and with them the registration) go first.
    db = await stack.enter_async_context(
        Database(settings.database_url, max_size=settings.db_pool_max)
    )
    broker = await stack.enter_async_context(Broker(settings.rabbitmq_url, name=spec.name))
    registry = await stack.enter_async_context(registry_factory(settings))
    health = Health(
        {"database": db.ping, "registry": registry.ping}, timeout=settings.health_timeout
    )
    # Reported, but no reason to stop serving: HTTP work goes on, the outbox holds the events.
    health.add_check("rabbitmq", broker.ping, critical=False)
    clients = await stack.enter_async_context(
        ServiceClient(registry, metrics=metrics.registry, tokens=tokens, engine=_engine(tracing))
    )
    tasks = await stack.enter_async_context(BackgroundTasks(grace=settings.loop_grace))
    # Every supervised loop in the details; one down past its grace makes the instance unready.
    health.add_check("background", tasks.check)
    health.add_detail("background", tasks.report)
    instance = ServiceInstance(
        service=spec.name,
        instance_id=settings.instance_id,
        host=settings.advertise_host,
        port=settings.port,
        meta={"version": spec.version},
    )
    return ServiceContext(settings, instance, metrics, health, db, broker, registry, tasks, clients)


def _engine(tracing: Tracing | None) -> AiohttpEngine | None:
    """The ServiceClient's engine: its default, with client spans when tracing is on."""
    if tracing is None:
        return None
    return AiohttpEngine(
        pool_size=ClientPolicy().pool_size, trace_configs=tracing.client_trace_configs()
    )


def _monitor_queues(ctx: ServiceContext, spec: ServiceSpec) -> None:
    """Consumer lag and dead letters as gauges, for a service that consumes."""
    if spec.consumer_queues:
        monitor = QueueMonitor(ctx.broker, spec.consumer_queues, registry=ctx.metrics.registry)
        ctx.tasks.supervise(monitor.run, name="queue-monitor")


async def keep_registered(ctx: ServiceContext, *, interval: float = PRESENCE_INTERVAL) -> None:
    """Announce the instance while it is ready and withdraw it while it is not.

    Runs for the life of the service; on cancellation (shutdown) it deregisters before the
    server stops answering, so callers stop picking this instance first.
    """
    registered = False
    try:
        while True:
            report = await ctx.health.check()
            # A registry outage says nothing about this instance: withdrawing would only
            # empty every caller's cache the moment the registry came back. (A broker outage
            # is an advisory check: it never withdraws the instance either.)
            ready = report.ready_without(["registry"])
            registered = await _sync_presence(ctx, ready=ready, registered=registered)
            await asyncio.sleep(interval)
    finally:
        if registered:
            await asyncio.shield(_withdraw(ctx))


async def _sync_presence(ctx: ServiceContext, *, ready: bool, registered: bool) -> bool:
    try:
        if ready:
            await ctx.registry.register(ctx.instance)
            if not registered:
                log.info("service.registered", instance=ctx.instance.instance_id)
            return True
        if registered:
            await ctx.registry.deregister(ctx.instance)
            log.warning("service.deregistered", reason="not ready")
    except RegistryError as exc:
        log.warning("registry.unavailable", error=str(exc))
        return registered
    return False


async def _withdraw(ctx: ServiceContext) -> None:
    try:
        async with asyncio.timeout(2):
            await ctx.registry.deregister(ctx.instance)
        log.info("service.deregistered", reason="shutdown")
    except (RegistryError, TimeoutError) as exc:
        log.warning("service.deregister_failed", error=str(exc))


def _warn_without_admin_token(settings: ServiceSettings) -> None:
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        log.warning("admin.disabled", hint="set ADMIN_TOKEN to use the admin endpoints")


def run_service(factory: Callable[[Any], FastAPI], settings_cls: type[ServiceSettings]) -> None:
    """``python -m <service>``: settings from the environment, JSON logs, uvicorn on uvloop."""
    settings = load_settings(settings_cls)
    configure_logging(
        service=settings.service_name, instance_id=settings.instance_id, level=settings.log_level
    )
    app = factory(settings)
    # Every module, route and model is built by now and lives as long as the process: out of
    # the collector's sight, a full collection no longer walks them all again (the cyclic GC
    # was 1.5-3% of a service's CPU under the saga bench).
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
