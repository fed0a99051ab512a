"""The RabbitMQ connection of a service, opened in the background and kept alive.

aio-pika's first connect fails fast even for a robust connection, so a broker that is down
at start-up would crash the service; :class:`Broker` retries that first connect with backoff
instead and reports its state to readiness.

>>> async with Broker(settings.rabbitmq_url) as broker:
...     await broker.ping()                  # raises BrokerUnavailable until connected
...     channel = await broker.connection.channel()
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection
from tenacity import AsyncRetrying, wait_random_exponential
from yarl import URL

log = structlog.get_logger(__name__)


class BrokerUnavailable(Exception):
    """No open connection to RabbitMQ right now."""


class Broker:
    """A robust aio-pika connection owned by an ``async with`` block."""

    def __init__(self, url: str, *, name: str = "ordermesh") -> None:
        self.url = url
        self.name = name
        self._connection: AbstractRobustConnection | None = None
        self._connector: asyncio.Task[None] | None = None
        self._last_error = "not connected yet"
        self.connected = asyncio.Event()

    @property
    def connection(self) -> AbstractRobustConnection:
        """The open connection; raises :class:`BrokerUnavailable` while there is none."""
        if self._connection is None or not self.connected.is_set() or self._connection.is_closed:
            raise BrokerUnavailable(self._last_error)
        return self._connection

    async def __aenter__(self) -> Broker:
        self._connector = asyncio.create_task(self._connect(), name="broker-connect")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
            await _let_aiormq_finish_closing()

    async def ping(self) -> None:
        """Health check: the connection is open (robust reconnects show up here as errors)."""
        if not self.connection.connected.is_set():  # lost; aio-pika is reconnecting
            raise BrokerUnavailable("connection lost; reconnecting")

    async def _connect(self) -> None:
        retrying = AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.2, max=5),
            before_sleep=self._note_failure,
        )
        async for attempt in retrying:
            with attempt:
                # Built here rather than by connect_robust() so that a connect cancelled at
                # shutdown still leaves us the object to close (it would go on reconnecting).
                connection = aio_pika.RobustConnection(
                    URL(self.url), client_properties={"connection_name": self.name}
                )
                self._connection = connection
                try:
                    await connection.connect(timeout=3)
                except Exception:
                    await connection.close()  # a failed first connect must not keep retrying
                    raise
        self.connected.set()
        log.info("broker.connected")

    def _note_failure(self, state: object) -> None:
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        self._last_error = f"cannot connect: {error}"
        log.warning("broker.unreachable", error=str(error))


async def _let_aiormq_finish_closing() -> None:
    # aiormq completes a close in tasks it spawns from done-callbacks; give them a few loop
    # turns so they finish before the caller's event loop may close under them.
    for _ in range(5):
        await asyncio.sleep(0)
