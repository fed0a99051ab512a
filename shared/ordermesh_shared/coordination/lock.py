"""A distributed lock over etcd's ``/v3/lock`` API, with lease renewal and a fencing token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from ordermesh_shared.coordination.errors import LockBusy, LockTimeout
from ordermesh_shared.coordination.lease import (
    LEASE_ATTEMPTS,
    LeaseKeeper,
    LeaseLapsed,
    check_name,
    check_ttl,
    guarded,
    release_quietly,
    time_left,
    unless_lost,
)
from ordermesh_shared.etcd_client import EtcdClient, LockKey, WaitTimeout

log = structlog.get_logger(__name__)

# try_hold: a lock seen free can still be taken by a racer before our request lands.
_TRY_ONCE_WAIT = 1.0


@dataclass(frozen=True, eq=False, slots=True)
class HeldLock:
    """What the holder of a lock gets.

    ``token`` is the fencing token: it grows from one holder to the next, so pass it to
    :func:`~ordermesh_shared.coordination.fence` with every write the lock protects.
    ``lost`` is set when renewal failed and the lease may lapse soon: stop writing.
    """

    name: str
    key: str
    token: int
    lease: int
    lost: asyncio.Event


class Lock:
    """A named etcd lock: at most one holder at a time while its lease is renewed.

    >>> lock = Lock(etcd, "/ordermesh/locks/nightly-report", ttl=5.0)
    >>> async with lock.hold(timeout=10.0) as held:      # LockTimeout if still busy after 10 s
    ...     await write_report(fencing_token=held.token)  # and watch held.lost

    The lock lives as long as its lease: renewed every TTL/4 while held, revoked on exit.
    A holder that crashes or freezes loses the lock at most about one TTL later (etcd checks
    expiry twice a second). A frozen holder that wakes up may still believe it holds the
    lock: that is what ``held.lost`` narrows and what the fencing token makes harmless.
    """

    def __init__(self, client: EtcdClient, name: str, *, ttl: float) -> None:
        self.name = check_name(name, what="lock")
        self.ttl = check_ttl(ttl)
        self._client = client

    @asynccontextmanager
    async def hold(self, timeout: float | None = 5.0) -> AsyncIterator[HeldLock]:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the lock, then hold it.

        Raises :class:`LockTimeout` if it stayed busy, :class:`CoordinationUnavailable` if
        etcd cannot be reached. The timeout covers the wait for other holders only.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        async with self._holding(timeout) as held:
            yield held

    @asynccontextmanager
    async def try_hold(self) -> AsyncIterator[HeldLock]:
        """Hold the lock if nobody holds it now; raise :class:`LockBusy` at once otherwise."""
        if await self._taken():
            raise LockBusy(f"lock {self.name!r} is held by someone else; try again later")
        async with self._holding(_TRY_ONCE_WAIT) as held:
            yield held

    @asynccontextmanager
    async def _holding(self, wait: float | None) -> AsyncIterator[HeldLock]:
        deadline = None if wait is None else time.monotonic() + wait
        for attempt in range(1, LEASE_ATTEMPTS + 1):
            async with LeaseKeeper(self._client, ttl=self.ttl, what=self._what) as keeper:
                try:
                    key = await self._acquire(keeper, time_left(deadline), wait)
                except LeaseLapsed as exc:  # nothing held yet: safe to start over
                    if attempt == LEASE_ATTEMPTS:
                        raise
                    log.warning("lock.lease_lapsed_while_waiting", lock=self.name, error=str(exc))
                    continue
                async with self._held(keeper, key) as held:
                    yield held
                return

    @asynccontextmanager
    async def _held(self, keeper: LeaseKeeper, key: LockKey) -> AsyncIterator[HeldLock]:
        log.info("lock.acquired", lock=self.name, token=key.revision)
        try:
            yield HeldLock(self.name, key.key, key.revision, keeper.lease, keeper.lost)
        finally:
            # Unlock first so the next holder need not wait for the revoke as well; once
            # the lease is lost, etcd is likely unreachable and the revoke alone will do.
            if not keeper.lost.is_set():
                await release_quietly(self._client.unlock(key.key), what=f"un{self._what}")
            log.info("lock.released", lock=self.name, token=key.revision)

    async def _acquire(
        self, keeper: LeaseKeeper, left: float | None, wait: float | None
    ) -> LockKey:
        request = guarded(self._request(keeper.lease, left, wait), what=self._what)
        return await unless_lost(request, keeper, what=self._what)

    async def _request(self, lease: int, left: float | None, wait: float | None) -> LockKey:
        try:
            return await self._client.lock(self.name, lease=lease, timeout=left)
        except WaitTimeout:
            raise LockTimeout(
                f"lock {self.name!r} still held by someone else after {wait} s; "
                "wait longer, or try later"
            ) from None

    @property
    def _what(self) -> str:
        return f"lock {self.name!r}"

    async def _taken(self) -> bool:
        """Whether anyone holds (or queues for) the lock: its keys live under ``name/``."""
        keys, _ = await guarded(self._client.get_prefix(f"{self.name}/"), what=self._what)
        return bool(keys)
