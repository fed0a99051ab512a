"""What a service runs for its outbox, started by the shared bootstrap.

Every instance: the lag monitor (metrics, ``/health/ready`` details) and the admin endpoints
(quarantine; the fence, re-based by ``ordermesh-outbox rebase-fence`` after etcd lost its
data). The relay, by ``settings.outbox_relay``, with its state in ``/health/ready`` (check and
detail ``outbox_relay``: ``standby``, ``leading`` or ``fenced_out``):

* ``elected`` (default) — every instance campaigns in the etcd election
  ``/ordermesh/elections/outbox-relay/<service>``; the leader relays, and its marks are fenced
  with its term's token. If etcd is down nobody relays (lag grows and shows), by design: two
  relays at once would reorder events.
* ``standalone`` — relay without etcd or fencing. Only for a deployment that runs exactly one
  instance of the service (say so explicitly: it is not a fallback taken silently).
* ``off`` — no relay in this process (another process relays).

>>> app.state.relay_view = install_outbox(
...     OutboxSite(settings, instance, db, broker, tasks, health, registry))
... # in the lifespan, after the migrations task was started
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast, get_args

import structlog
from fastapi import APIRouter
from prometheus_client import CollectorRegistry

from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.coordination import Election
from ordermesh_shared.database import Database
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.etcd_client import EtcdClient
from ordermesh_shared.health import Health
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.outbox.admin import RelayView, fence_admin_router, outbox_admin_router
from ordermesh_shared.outbox.metrics import OutboxMetrics, OutboxMonitor
from ordermesh_shared.outbox.rebase import RelayFence
from ordermesh_shared.outbox.relay import Fence, OutboxRelay, SoleLeader, no_fence
from ordermesh_shared.tasks import BackgroundTasks

log = structlog.get_logger(__name__)

RelayMode = Literal["elected", "standalone", "off"]
# The relay leader's lease: failover takes about this long (measured 1.9-2.1 s with 2.0).
ELECTION_TTL = 2.0
# A re-base waits until the stored token was last accepted this long ago: a relay of a wiped
# etcd loses its lease (and stops) within one TTL; one still publishing refreshes the token.
REBASE_QUIET = 3 * ELECTION_TTL


def relay_mode(settings: object) -> RelayMode:
    """``settings.outbox_relay`` (``elected`` when the settings class has no such field)."""
    mode = getattr(settings, "outbox_relay", "elected")
    for known in get_args(RelayMode):
        if mode == known:
            return cast(RelayMode, known)
    raise ValueError(f"OUTBOX_RELAY={mode!r}: expected one of {get_args(RelayMode)}")


def election_name(service: str) -> str:
    return f"/ordermesh/elections/outbox-relay/{service}"


def fence_resource(service: str) -> str:
    """The relay's row in ``fencing_tokens``."""
    return f"outbox-relay/{service}"


def relay_site(service: str, etcd_url: str) -> RelayFence:
    """Where ``service``'s relay fence lives (for the admin API's re-base)."""
    return RelayFence(service, fence_resource(service), election_name(service), etcd_url)


def relay_fence(service: str) -> Fence:
    """Fence marks with the election token; a stale leader gets :class:`FencedOut`."""
    return Fence(fence_resource(service))


async def run_elected(relay: OutboxRelay, *, etcd_url: str, instance_id: str) -> None:
    """Campaign on etcd and relay while leading, until cancelled."""
    async with EtcdClient(etcd_url) as etcd:
        election = Election(etcd, election_name(relay.service), ttl=ELECTION_TTL, value=instance_id)
        await relay.run(election)


@dataclass(frozen=True)
class OutboxSite:
    """What the outbox of one service instance runs on (its part of the service context)."""

    settings: ServiceSettings
    instance: ServiceInstance
    db: Database
    broker: Broker
    tasks: BackgroundTasks
    health: Health
    registry: CollectorRegistry  # the app's Prometheus registry


def install_outbox(site: OutboxSite) -> RelayView:
    """Monitor and (by mode) the relay, as background tasks of the service; returns what the
    admin endpoints (made with the app) look at."""
    db, health, tasks = site.db, site.health, site.tasks
    metrics = OutboxMetrics(site.registry)
    monitor = OutboxMonitor(db, metrics)
    health.add_detail("outbox", monitor.lag_json)
    tasks.supervise(monitor.run, name="outbox-monitor")
    mode = relay_mode(site.settings)
    service = site.instance.service
    etcd_url = site.settings.etcd_url
    log.info("outbox.relay_mode", mode=mode)
    fence_site = None if mode == "standalone" else relay_site(service, etcd_url)
    if mode == "off":  # another process relays (its fence can still be looked at here)
        return RelayView(fence_site, status=None)
    fenced = relay_fence(service) if mode == "elected" else no_fence
    relay = OutboxRelay(db, site.broker, service=service, fence=fenced, metrics=metrics)
    # Advisory: a relay fenced out (etcd lost its data) makes the status "degraded" and says
    # what to do, but the instance stays ready and registered. Its HTTP work does not need
    # the relay (events wait in the outbox), and every instance is fenced out alike: taking
    # them out of the registry would turn a stalled event stream into a full outage.
    health.add_check("outbox_relay", relay.status.check, critical=False)
    health.add_detail("outbox_relay", relay.status.as_json)
    if mode == "standalone":
        tasks.supervise(lambda: relay.run(SoleLeader()), name="outbox-relay")
    else:
        instance_id = site.instance.instance_id
        tasks.supervise(
            lambda: run_elected(relay, etcd_url=etcd_url, instance_id=instance_id),
            name="outbox-relay",
        )
    return RelayView(fence_site, relay.status)


def outbox_routers() -> list[APIRouter]:
    """The quarantine and fence endpoints, added when the app is made."""
    return [outbox_admin_router(), fence_admin_router(quiet=REBASE_QUIET)]
