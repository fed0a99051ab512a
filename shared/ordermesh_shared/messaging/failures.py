"""Which failures pass with time (wait and retry) and which are a message's or a bug's fault.

>>> if is_transient(exc): await asyncio.sleep(backoff)   # the database or broker is away
"""

from __future__ import annotations

from typing import Protocol

import asyncpg
from aio_pika.abc import AbstractConnection

from ordermesh_shared.broker import BrokerUnavailable
from ordermesh_shared.database import DatabaseNotReady

_TRANSIENT = (
    DatabaseNotReady,
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    # A pooled connection cut mid-operation can surface as a state error instead.
    asyncpg.InternalClientError,
    BrokerUnavailable,
)
# SQLSTATE classes: connection exception, insufficient resources, operator intervention
# (e.g. 57P01 "terminating connection due to administrator command" on a restart).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57"})


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


def is_transient(exc: BaseException) -> bool:
    """True when the database or the broker is (briefly) away, not when the work is wrong."""
    if isinstance(exc, _TRANSIENT):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
