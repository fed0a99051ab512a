"""The overview's view of the platform around the sagas: breakers as this order instance sees
them, registry instances with their health, relay leaders, outbox lag and consumer lag.

Every reading is bounded by ``PROBE_TIMEOUT`` and fails alone: what cannot be read shows as
``unknown`` with the reason, beside everything that could.

Instances are probed on their public ``GET /health/ready`` with an engine of the overview's
own, not through the ``ServiceClient``: a probe must reach each instance (not one the
balancer picks), and the page's polling must not feed the breakers it shows (a successful
probe would close a half-open breaker that the saga's calls opened). The same readiness body
carries each service's outbox lag (``details.outbox``) and its instance's relay state
(``details.outbox_relay``); the admin endpoints would need the operator's token at every
participant, and none of them reports the lag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

import structlog
from aio_pika.abc import AbstractChannel
from ordermesh_shared.bootstrap import ServiceContext
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.etcd_client import EtcdClient
from ordermesh_shared.messaging.topology import DEAD_LETTER_QUEUE
from ordermesh_shared.outbox.store import outbox_lag
from ordermesh_shared.outbox.wiring import election_name
from ordermesh_shared.resilience import ServiceClient
from ordermesh_shared.resilience.transport import AiohttpEngine
from pydantic import BaseModel

from order.timeline import TIMELINE_QUEUE

log = structlog.get_logger(__name__)

PARTICIPANTS = ("inventory", "payment", "shipping")
SERVICES = ("order", *PARTICIPANTS)
QUEUES = (TIMELINE_QUEUE, DEAD_LETTER_QUEUE)
PROBE_TIMEOUT = 1.0  # seconds for any one reading: the page asks again 1 s after each answer

Known = Literal["ok", "unknown"]
Health = Literal["ok", "degraded", "unavailable", "unknown"]
T = TypeVar("T")


class BreakersView(BaseModel):
    """Breaker state (closed, half-open, open) by participant and instance."""

    status: Known = "ok"
    reason: str | None = None
    targets: dict[str, dict[str, str]] = {}


class InstanceView(BaseModel):
    """One registered instance and what its ``/health/ready`` says."""

    instance_id: str
    url: str
    health: Health
    reason: str | None = None  # the failing checks, or why the health is unknown
    relay: str | None = None  # its outbox relay: standby, leading or fenced_out


class LeaderView(BaseModel):
    """Who leads the service's outbox relay election in etcd (None: nobody)."""

    status: Known = "ok"
    reason: str | None = None
    leader: str | None = None


class OutboxView(BaseModel):
    """The service's outbox: events waiting, the oldest one's age, rows in quarantine."""

    status: Known = "ok"
    reason: str | None = None
    pending: int | None = None
    oldest_pending_age_seconds: float | None = None
    quarantined: int | None = None
    source: str | None = None  # "database" (order's own) or the instance that reported it


class ServiceView(BaseModel):
    """A service: its registered instances, relay leader and outbox."""

    name: str
    status: Known = "ok"  # of the registry reading
    reason: str | None = None
    instances: list[InstanceView] = []
    relay_leader: LeaderView
    outbox: OutboxView


class QueueView(BaseModel):
    """A consumer queue's depth (ready messages) and consumers; or unknown."""

    name: str
    status: Known = "ok"
    reason: str | None = None
    messages: int | None = None
    consumers: int | None = None


async def bounded(read: Callable[[], Awaitable[T]], *, what: str, unknown: Callable[[str], T]) -> T:
    """``read()`` within PROBE_TIMEOUT; ``unknown(reason)`` when it fails in any way (one part
    of the page must never take the others, or the whole answer, down with it)."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await read()
    except TimeoutError:
        return unknown(f"no answer within {PROBE_TIMEOUT:g} s")
    except Exception as exc:
        log.info("overview.part_unknown", part=what, error=repr(exc))
        return unknown(_describe(exc))


def read_breakers(clients: ServiceClient) -> BreakersView:
    """The breakers of the instances the order service has called (others have none yet)."""
    return BreakersView(targets={s: clients.service(s).breaker_states() for s in PARTICIPANTS})


# -- services -------------------------------------------------------------------------------


async def read_services(ctx: ServiceContext) -> list[ServiceView]:
    """Every service's instances, leader and outbox, read concurrently."""
    # Opened per refresh (about every second per open page): nothing worth keeping open
    # between them.
    async with (
        AiohttpEngine(pool_size=16) as engine,
        EtcdClient(ctx.settings.etcd_url, timeout=PROBE_TIMEOUT) as etcd,
    ):
        return list(await asyncio.gather(*(_service(ctx, engine, etcd, s) for s in SERVICES)))


async def _service(
    ctx: ServiceContext, engine: AiohttpEngine, etcd: EtcdClient, name: str
) -> ServiceView:
    leader, (instances, unreachable) = await asyncio.gather(
        read_leader(etcd, name), _registered(ctx, name)
    )
    probes = await asyncio.gather(*(_probe(ctx, engine, i) for i in instances))
    return ServiceView(
        name=name,
        status="ok" if unreachable is None else "unknown",
        reason=unreachable,
        instances=[view for view, _ in probes],
        relay_leader=leader,
        outbox=await _outbox(ctx, name, probes, unreachable),
    )


Registered = tuple[Sequence[ServiceInstance], str | None]  # the instances, or why none are known


async def _registered(ctx: ServiceContext, name: str) -> Registered:
    async def read() -> Registered:
        await ctx.registry.watch(name)  # idempotent: the first call starts the cache
        return ctx.registry.instances(name), None

    return await bounded(read, what=f"registry:{name}", unknown=lambda r: ((), f"registry: {r}"))


async def read_leader(etcd: EtcdClient, service: str) -> LeaderView:
    """The value (instance id) of the leader of ``service``'s relay election."""

    async def read() -> LeaderView:
        kv = await etcd.leader(election_name(service))
        return LeaderView(leader=None if kv is None else kv.value.decode("utf-8", "replace"))

    return await bounded(
        read, what=f"leader:{service}", unknown=lambda r: LeaderView(status="unknown", reason=r)
    )


Probe = tuple[InstanceView, dict[str, Any] | None]


async def _probe(ctx: ServiceContext, engine: AiohttpEngine, instance: ServiceInstance) -> Probe:
    async def read() -> Probe:
        if instance.instance_id == ctx.instance.instance_id:
            report = (await ctx.health.check()).as_json()  # this very process: no HTTP hop
        else:
            report = await _ready_body(engine, instance)
        return _instance_view(instance, report), report

    def unknown(reason: str) -> Probe:
        view = InstanceView(
            instance_id=instance.instance_id,
            url=instance.base_url,
            health="unknown",
            reason=reason,
        )
        return view, None

    return await bounded(read, what=f"health:{instance.instance_id}", unknown=unknown)


async def _ready_body(engine: AiohttpEngine, instance: ServiceInstance) -> dict[str, Any]:
    url = f"{instance.base_url}/health/ready"
    answer = await engine.send("GET", url, headers={}, body=None, time_limit=PROBE_TIMEOUT)
    try:
        body = answer.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("status") not in ("ok", "degraded", "unavailable"):
        raise ValueError(f"answered {answer.status} without a health report")
    return body


def _instance_view(instance: ServiceInstance, report: dict[str, Any]) -> InstanceView:
    checks = report.get("checks") or {}
    failing = [f"{name}: {result}" for name, result in checks.items() if result != "ok"]
    relay = (report.get("details") or {}).get("outbox_relay")
    return InstanceView(
        instance_id=instance.instance_id,
        url=instance.base_url,
        health=report["status"],
        reason="; ".join(failing) or None,
        relay=relay.get("state") if isinstance(relay, dict) else None,
    )


async def _outbox(
    ctx: ServiceContext, name: str, probes: Sequence[Probe], unreachable: str | None
) -> OutboxView:
    if name == "order":
        return await bounded(
            lambda: _own_outbox(ctx),
            what="outbox:order",
            unknown=lambda r: OutboxView(status="unknown", reason=r),
        )
    if unreachable is not None:
        return OutboxView(status="unknown", reason=unreachable)
    return _reported_outbox(probes)


async def _own_outbox(ctx: ServiceContext) -> OutboxView:
    async with ctx.db.pool.acquire() as conn:
        lag = await outbox_lag(conn)
    return OutboxView(**lag.as_json(), source="database")


def _reported_outbox(probes: Sequence[Probe]) -> OutboxView:
    """The lag from the first instance that reported one (each reads the same table)."""
    reasons = []
    for view, report in probes:
        detail = (report or {}).get("details", {}).get("outbox")
        if isinstance(detail, dict):
            return OutboxView(**detail, source=view.instance_id)
        reasons.append(f"{view.instance_id}: {view.reason or detail or 'no outbox detail'}")
    reason = "; ".join(reasons) or "no instance registered"
    return OutboxView(status="unknown", reason=reason)


# -- queues ---------------------------------------------------------------------------------


async def read_queues(ctx: ServiceContext) -> list[QueueView]:
    """Depth and consumers of every consumer queue and the dead letters."""
    return list(await asyncio.gather(*(_queue(ctx, name) for name in QUEUES)))


async def _queue(ctx: ServiceContext, name: str) -> QueueView:
    async def read() -> QueueView:
        # A channel per queue: a passive declare of a missing queue closes its channel.
        channel: AbstractChannel = await ctx.broker.connection.channel()
        try:
            # passive: only reads the counts, never creates the queue or changes its arguments
            queue = await channel.declare_queue(name, passive=True)
        finally:
            await channel.close()
        result = queue.declaration_result
        return QueueView(name=name, messages=result.message_count, consumers=result.consumer_count)

    return await bounded(
        read,
        what=f"queue:{name}",
        unknown=lambda r: QueueView(name=name, status="unknown", reason=r),
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
