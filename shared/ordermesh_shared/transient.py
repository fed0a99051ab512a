"""Which failures pass with time (wait and retry) and which are a message's or a bug's fault.

One classification for every loop (relay, consumers, saga heartbeat and recovery, presence):
the database or the broker restarting, a connection cut mid-operation, the network away.

>>> if is_transient(exc): await asyncio.sleep(backoff)   # the database or broker is away
"""

from __future__ import annotations

import aiohttp
import aiormq.exceptions

from ordermesh_shared.database import DatabaseNotReady, is_transient_database_error
from ordermesh_shared.messaging.broker import BrokerUnavailable

_TRANSIENT: tuple[type[BaseException], ...] = (
    DatabaseNotReady,
    BrokerUnavailable,
    # Connection refused/reset, aiormq's connection errors, asyncio timeouts.
    OSError,
    TimeoutError,
    # aio-pika/aiormq: a channel closed under us (the broker restarted, or a reconnect is on).
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    # aiohttp (etcd, Consul): connection errors, a server that went away mid-answer.
    aiohttp.ClientError,
)


def is_transient(exc: BaseException) -> bool:
    """True when the database or the broker is (briefly) away, not when the work is wrong."""
    # asyncpg's side (cuts, busy or restarting server) is the database module's to know.
    return isinstance(exc, _TRANSIENT) or is_transient_database_error(exc)
