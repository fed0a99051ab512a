"""RabbitMQ topology: where events are published, where consumers read them, where failures go.

* ``ordermesh.events`` — a durable topic exchange; every event is published there with the
  routing key ``<service>.<event_type>`` (e.g. ``inventory.stock_reserved``).
* one durable **quorum** queue per consumer, bound with topic patterns (``inventory.*``,
  ``*.order_created``, ``#``), dead-lettering to ``ordermesh.dlx``.
* ``ordermesh.dlx`` — a durable topic exchange, and ``ordermesh.dead-letters`` bound to it with
  ``#``: messages that failed too often or could not be read, with RabbitMQ's ``x-death``
  header saying from which queue and why. (Both also appear in deploy/rabbitmq/definitions.json.)

Why quorum queues: RabbitMQ 3.10's classic queues do not count deliveries, so a consumer would
have to count attempts itself, and a consumer that crashes while handling a message (the worst
poison) never gets to count anything. A quorum queue counts every return of a message, including
those caused by a crashed consumer, and dead-letters it after ``x-delivery-limit`` returns. The
consumer still dead-letters explicitly after its own ``max_deliveries`` (so the log says why);
the queue's limit is the backstop for crash loops. Dead-lettering is ``at-least-once`` (needs
``x-overflow=reject-publish``), so a message is never dropped between queue and dead-letter queue.

>>> topology = Topology()
>>> exchange = await declare_events_exchange(channel, topology)
>>> queue = await declare_consumer_queue(channel, topology, "order.timeline", ["#"])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

EVENTS_EXCHANGE = "ordermesh.events"
DEAD_LETTER_EXCHANGE = "ordermesh.dlx"
DEAD_LETTER_QUEUE = "ordermesh.dead-letters"
DEFAULT_MAX_DELIVERIES = 5

# One routing-key word: no dots, no topic wildcards, so "<service>.<event>" stays two words.
_WORD = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Topology:
    """Names of the shared exchanges and the dead-letter queue (tests use their own).

    >>> Topology().routing_key("inventory", "stock_reserved")
    'inventory.stock_reserved'
    """

    events_exchange: str = EVENTS_EXCHANGE
    dead_letter_exchange: str = DEAD_LETTER_EXCHANGE
    dead_letter_queue: str = DEAD_LETTER_QUEUE

    @staticmethod
    def routing_key(service: str, event_type: str) -> str:
        """``<service>.<event_type>``; both must be one lowercase word."""
        check_word(service, what="service name")
        check_word(event_type, what="event type")
        return f"{service}.{event_type}"


def check_word(value: str, *, what: str) -> str:
    """Refuse what would break the two-word routing key (dots, wildcards, capitals)."""
    if not _WORD.match(value):
        raise ValueError(f"{what} {value!r} must match {_WORD.pattern} (one routing-key word)")
    return value


async def declare_events_exchange(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    """The durable topic exchange events are published to (idempotent)."""
    return await channel.declare_exchange(
        topology.events_exchange, ExchangeType.TOPIC, durable=True
    )


async def declare_dead_letters(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """The dead-letter exchange and its catch-all queue (idempotent)."""
    dlx = await channel.declare_exchange(
        topology.dead_letter_exchange, ExchangeType.TOPIC, durable=True
    )
    # Same arguments as deploy/rabbitmq/definitions.json: a redeclare with others would fail.
    queue = await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "classic"}
    )
    await queue.bind(dlx, "#")
    return queue


def consumer_queue_arguments(
    topology: Topology, *, max_deliveries: int = DEFAULT_MAX_DELIVERIES
) -> FieldTable:
    """Arguments of a consumer's queue: quorum, delivery limit, at-least-once dead-lettering."""
    if max_deliveries < 1:
        raise ValueError("max_deliveries must be at least 1")
    return {
        "x-queue-type": "quorum",
        # The consumer gives up after max_deliveries itself; the broker's count (returns, not
        # deliveries: limit N allows N+1 deliveries) only catches a consumer that dies mid-way.
        "x-delivery-limit": max_deliveries,
        "x-dead-letter-exchange": topology.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_consumer_queue(
    channel: AbstractChannel,
    topology: Topology,
    name: str,
    bindings: Sequence[str],
    *,
    max_deliveries: int = DEFAULT_MAX_DELIVERIES,
) -> AbstractQueue:
    """A consumer's durable queue bound to ``bindings`` on the events exchange (idempotent)."""
    if not bindings:
        raise ValueError(f"queue {name!r} needs at least one binding pattern")
    exchange = await declare_events_exchange(channel, topology)
    await declare_dead_letters(channel, topology)
    queue = await channel.declare_queue(
        name,
        durable=True,
        arguments=consumer_queue_arguments(topology, max_deliveries=max_deliveries),
    )
    for pattern in bindings:
        await queue.bind(exchange, pattern)
    return queue
