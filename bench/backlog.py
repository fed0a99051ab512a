"""Deferred work at the edges of a measured window: outbox rows and queued messages.

A window's throughput can be flattered by work it leaves behind: events committed to an
outbox but not yet published, messages published but not yet consumed. So every measured
window of the platform takes a :class:`Backlog` at its start and its end, and a window whose
backlog grew by more than :data:`GROWTH_SLACK` is flagged in the report.

* outbox pending: rows neither published nor quarantined, in each service's database;
* queue depth: messages ready in each queue of the stack's vhost, by passive declare
  (the broker's management plugin is not enabled here, and a passive declare costs one
  round trip on a connection already open, where ``rabbitmqctl`` would start a VM).

    async with BacklogProbe.of(stack) as probe:
        before = await probe.snapshot()
        ...                                   # the measured window
        growth = window_growth(before, await probe.snapshot())
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import aio_pika
import asyncpg
from ordermesh_deploy.local import SERVICES

from bench.bare_saga import connect

if TYPE_CHECKING:
    from bench.saga import LocalStack

# A handful of events is always between a commit and its ack at these rates: counts that
# small are the pipeline's depth at one instant, not deferred work.
GROWTH_SLACK = 20
# The stand-in for the timeline queue (bench/saga.py) has no consumer and is capped: it is
# always full, by design, so it says nothing about backlog.
IGNORED_QUEUES = frozenset({"bench.sink"})
PENDING_SQL = (
    "SELECT CASE WHEN to_regclass('outbox') IS NULL THEN 0 ELSE"
    " (SELECT count(*) FROM outbox WHERE published_at IS NULL AND quarantined_at IS NULL) END"
)


@dataclass(frozen=True)
class Backlog:
    """Outbox rows pending per service and messages ready per queue, at one moment."""

    outbox: Mapping[str, int]
    queues: Mapping[str, int]

    @property
    def total(self) -> int:
        """Every pending row and ready message."""
        return sum(self.outbox.values()) + sum(self.queues.values())

    def as_json(self) -> dict[str, Any]:
        """The snapshot as the report lists it."""
        return {"outbox_pending": dict(self.outbox), "queue_ready": dict(self.queues)}


def window_growth(start: Backlog, end: Backlog) -> dict[str, Any]:
    """What one window left behind: both snapshots, the growth, and whether it counts."""
    grew = end.total - start.total
    return {
        "start": start.as_json(),
        "end": end.as_json(),
        "growth": grew,
        "grew": grew > GROWTH_SLACK,
    }


class BacklogProbe:
    """One connection per service database and one AMQP channel, kept open across windows
    (opening them at a window's edge would cost the window's CPU figures)."""

    def __init__(self, dsns: Mapping[str, str], amqp_url: str, queues: list[str]) -> None:
        self._dsns = dict(dsns)
        self._amqp_url = amqp_url
        self._queue_names = queues
        self._conns: dict[str, asyncpg.Connection] = {}
        self._amqp: aio_pika.abc.AbstractConnection | None = None

    @classmethod
    async def of(cls, stack: LocalStack) -> BacklogProbe:
        """A probe of a started stack: its four databases and its vhost's queues."""
        dsns = {service: stack.database_url(service) for service in SERVICES}
        amqp_url = stack.stack.rabbitmq_url
        return cls(dsns, amqp_url, await list_queues(vhost_of(amqp_url)))

    async def __aenter__(self) -> Self:
        for service, dsn in self._dsns.items():
            self._conns[service] = await connect(dsn)
        self._amqp = await aio_pika.connect(self._amqp_url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for conn in self._conns.values():
            await conn.close()
        if self._amqp is not None:
            await self._amqp.close()

    async def snapshot(self) -> Backlog:
        """The backlog now."""
        outbox = {s: int(await c.fetchval(PENDING_SQL)) for s, c in self._conns.items()}
        return Backlog(outbox, await self._queue_depths())

    async def _queue_depths(self) -> dict[str, int]:
        assert self._amqp is not None, "use BacklogProbe inside 'async with'"
        depths = {}
        for name in self._queue_names:
            # A channel per declare: a queue gone since the listing closes its channel.
            channel = await self._amqp.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = int(queue.declaration_result.message_count or 0)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                continue
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        return depths


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names ("/" when it names none)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) or "/"


async def list_queues(vhost: str) -> list[str]:
    """Names of the vhost's queues (once per stack, outside every window)."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "--no-table-headers",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    output, _ = await process.communicate()
    names = output.decode(errors="replace").split()
    return sorted(name for name in names if name not in IGNORED_QUEUES)
