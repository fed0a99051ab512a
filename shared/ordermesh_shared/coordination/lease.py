"""Lease keeping shared by locks and elections, and the plumbing both need.

A lock or a leadership lives exactly as long as its etcd lease. :class:`LeaseKeeper` grants
the lease, renews it in the background, and sets ``lost`` *before* the lease can lapse: as
soon as ``SAFE_FRACTION`` of the TTL has passed since the last renewal etcd confirmed (timed
from when that renewal was sent, so etcd's countdown cannot have started earlier). The rest
of the TTL is the holder's margin to stop its work while nobody else can hold the lease yet.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, Self, TypeVar

import structlog

from ordermesh_shared.coordination.errors import CoordinationError, CoordinationUnavailable
from ordermesh_shared.etcd_client import EtcdClient, EtcdError, EtcdUnavailable, LeaseNotFound

log = structlog.get_logger(__name__)

T = TypeVar("T")

SAFE_FRACTION = 0.6  # of the TTL: how long we trust a lease after its last confirmed renewal
RENEW_FRACTION = 1 / 4  # of the TTL: renewal period (several tries fit the trust window)
RETRY_FRACTION = 0.1  # of the TTL: retry period after a failed renewal
RELEASE_TIMEOUT = 1.0  # seconds per release call (unlock, resign, revoke) when leaving
LEASE_ATTEMPTS = 3  # fresh leases for one wait, should one lapse (e.g. a starved process)

_UNAVAILABLE_HINT = (
    "locks and elections need etcd: check that it runs and that ETCD_URL points at it "
    "(locally: `make dev` starts one)"
)


def check_name(name: str, *, what: str) -> str:
    """``name`` if usable as an etcd lock or election name, else ValueError saying why."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} name must be a non-empty string, got {name!r}")
    return name


def check_ttl(ttl: float) -> float:
    """``ttl`` if it is a positive number of seconds, else ValueError saying why."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ValueError(
            f"ttl must be a positive number of seconds, got {ttl!r} "
            "(etcd rounds it up to whole seconds and to its minimum, 2 s by default)"
        )
    return float(ttl)


async def guarded(call: Awaitable[T], *, what: str) -> T:
    """Await an etcd call, translating its errors into the coordination hierarchy."""
    try:
        return await call
    except EtcdUnavailable as exc:
        raise CoordinationUnavailable(f"{what}: {exc}; {_UNAVAILABLE_HINT}") from exc
    except EtcdError as exc:
        raise CoordinationError(f"{what}: {exc}") from exc


async def release_quietly(call: Coroutine[Any, Any, None], *, what: str) -> None:
    """Best-effort release: bounded, and only logged on failure (the lease expires anyway)."""
    try:
        async with asyncio.timeout(RELEASE_TIMEOUT):
            await call
    except LeaseNotFound:
        pass  # already expired: what we wanted to achieve has happened
    except (EtcdError, TimeoutError) as exc:
        log.warning("coordination.release_failed", what=what, error=str(exc) or "timed out")


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they have finished (no orphans, no lost errors)."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


class LeaseLapsed(CoordinationUnavailable):
    """The lease lapsed while waiting for a lock or an election: nothing was held yet."""


def time_left(deadline: float | None) -> float | None:
    """Seconds until the monotonic ``deadline`` (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def unless_lost(call: Coroutine[Any, Any, T], keeper: LeaseKeeper, *, what: str) -> T:
    """Await ``call``, abandoning it with :class:`LeaseLapsed` if the keeper's lease is lost.

    A campaign or lock request waits server-side; if our lease lapses meanwhile, the wait
    is pointless, and etcd 3.4 may even answer it as if our (deleted) key had won.
    """
    task = asyncio.create_task(call, name=what)
    watcher = asyncio.create_task(keeper.lost.wait(), name=f"{what}: lease watch")
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(task, watcher)
    if task.cancelled():
        raise LeaseLapsed(f"{what}: the lease lapsed while waiting ({keeper.lost_reason})")
    return task.result()


class Backoff:
    """Exponential delays with equal jitter between ``first`` and ``cap``: never a hot loop.

    >>> backoff = Backoff()
    >>> await backoff.sleep()  # 0.05-0.1 s, then 0.1-0.2 s, ... up to 1-2 s
    >>> backoff.reset()
    """

    def __init__(self, *, first: float = 0.1, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self._delay = first

    def reset(self) -> None:
        self._delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(random.uniform(self._delay / 2, self._delay))
        self._delay = min(self._delay * 2, self.cap)


class LeaseKeeper:
    """An etcd lease granted on entry, renewed in the background, revoked on exit.

    >>> async with LeaseKeeper(client, ttl=2.0, what="lock 'jobs'") as keeper:
    ...     await client.lock("jobs", lease=keeper.lease)
    ...     await keeper.lost.wait()  # set 0.6 x TTL after the last confirmed renewal
    """

    def __init__(self, client: EtcdClient, *, ttl: float, what: str) -> None:
        self._client = client
        self.ttl = check_ttl(ttl)
        self.what = what
        self.lease = 0
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._trusted_until = 0.0  # monotonic time up to which the lease surely lives
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        sent = time.monotonic()
        # etcd leases are whole seconds; rounding up only lengthens our safety margin.
        ttl = max(1, math.ceil(self.ttl))
        self.lease = await guarded(self._client.lease_grant(ttl), what=f"{self.what}: lease")
        self._trusted_until = sent + self.ttl * SAFE_FRACTION
        self._task = asyncio.create_task(self._renew(), name=f"{self.what}: keepalive")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await release_quietly(self._client.lease_revoke(self.lease), what=f"{self.what}: revoke")

    async def _renew(self) -> None:
        period = self.ttl * RENEW_FRACTION
        while not self.lost.is_set():
            # Wake at the trust deadline at the latest, so loss is reported on time.
            await asyncio.sleep(max(0.0, min(period, self._trusted_until - time.monotonic())))
            renewed = await self._renew_once()
            period = self.ttl * (RENEW_FRACTION if renewed else RETRY_FRACTION)

    async def _renew_once(self) -> bool:
        remaining = self._trusted_until - time.monotonic()
        if remaining <= 0:  # e.g. this process was paused: the lease may be gone already
            self._lose(f"no renewal confirmed for {self.ttl * SAFE_FRACTION:.2f} s")
            return False
        sent = time.monotonic()
        try:
            async with asyncio.timeout(remaining):
                await self._client.lease_keepalive(self.lease)
        except LeaseNotFound:
            self._lose("etcd says the lease expired")
            return False
        except TimeoutError:
            self._lose(f"no renewal confirmed for {self.ttl * SAFE_FRACTION:.2f} s")
            return False
        except EtcdError as exc:
            # Retry until the deadline: etcd keeps leases across its restarts.
            log.warning("coordination.renewal_failed", what=self.what, error=str(exc))
            return False
        self._trusted_until = sent + self.ttl * SAFE_FRACTION
        return True

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        log.warning(
            "coordination.lease_lost", what=self.what, lease=f"{self.lease:x}", reason=reason
        )
