"""Which failures pass with time (wait and retry) and which are a message's or a bug's fault.

One classification for every loop (relay, consumers, saga heartbeat and recovery, presence):
the database or the broker restarting, a connection cut mid-operation, the network away.

>>> if is_transient(exc): await asyncio.sleep(backoff)   # the database or broker is away
"""

from __future__ import annotations

import aiohttp
import aiormq.exceptions
import asyncpg

from ordermesh_shared.broker import BrokerUnavailable
from ordermesh_shared.database import DatabaseNotReady

_TRANSIENT: tuple[type[BaseException], ...] = (
    DatabaseNotReady,
    BrokerUnavailable,
    # Connection refused/reset, aiormq's connection errors, asyncio timeouts.
    OSError,
    TimeoutError,
    # asyncpg: a connection closed or cut mid-operation ("connection is closed", "another
    # operation is in progress" after a cancelled query), or left in a bad protocol state.
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    # aio-pika/aiormq: a channel closed under us (the broker restarted, or a reconnect is on).
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    # aiohttp (etcd, Consul): connection errors, a server that went away mid-answer.
    aiohttp.ClientError,
)
# SQLSTATE classes: connection exception, transaction rollback (serialization failure,
# deadlock), insufficient resources, operator intervention (e.g. 57P01 "terminating
# connection due to administrator command", 57P03 "the database system is starting up").
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57"})


def is_transient(exc: BaseException) -> bool:
    """True when the database or the broker is (briefly) away, not when the work is wrong."""
    if isinstance(exc, _TRANSIENT):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
