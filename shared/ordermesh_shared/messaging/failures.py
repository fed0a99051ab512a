"""The broker connection as publishers and consumers take it, and which failures pass with
time (:func:`is_transient`, defined in :mod:`ordermesh_shared.transient`).

>>> if is_transient(exc): await asyncio.sleep(backoff)   # the database or broker is away
"""

from __future__ import annotations

from typing import Protocol

from aio_pika.abc import AbstractConnection

from ordermesh_shared.messaging.broker import BrokerUnavailable
from ordermesh_shared.transient import is_transient

__all__ = ["ConnectionSource", "is_transient", "open_connection"]


class ConnectionSource(Protocol):
    """Where publishers and consumers get their AMQP connection (``Broker`` satisfies it)."""

    @property
    def connection(self) -> AbstractConnection: ...


def open_connection(source: ConnectionSource) -> AbstractConnection:
    """The connection if it is open now; :class:`BrokerUnavailable` while it is (re)connecting."""
    connection = source.connection
    if not connection.connected.is_set():
        raise BrokerUnavailable("the broker connection is reconnecting")
    return connection
