"""The etcd backend of :class:`~ordermesh_shared.discovery.base.Registry`: lease-backed keys.

An instance lives at ``<prefix><service>/<instance_id>`` (JSON of the instance), attached to a
lease of ``ttl`` seconds that a background task keeps alive. A process that dies stops the
keepalives, so its key vanishes within the TTL; a graceful ``deregister`` revokes the lease
and the key vanishes at once. Watchers list a service's prefix once, then follow a watch
stream from the listing's revision; a broken stream is healed by listing again.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import orjson
import structlog

from ordermesh_shared.discovery.base import RegistryError, ServiceInstance
from ordermesh_shared.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    EventType,
    KeyValue,
    LeaseNotFound,
    WatchBatch,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

_RELIST_BACKOFF_FIRST = 0.1  # seconds
_RELIST_BACKOFF_MAX = 2.0


def encode_instance(instance: ServiceInstance) -> bytes:
    return orjson.dumps(
        {
            "service": instance.service,
            "instance_id": instance.instance_id,
            "host": instance.host,
            "port": instance.port,
            "meta": instance.meta,
        }
    )


def decode_instance(raw: bytes) -> ServiceInstance:
    """The instance stored in a key; ValueError if the value is not one."""
    try:
        data = orjson.loads(raw)
        return ServiceInstance(
            service=str(data["service"]),
            instance_id=str(data["instance_id"]),
            host=str(data["host"]),
            port=int(data["port"]),
            meta={str(k): str(v) for k, v in data.get("meta", {}).items()},
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"not a service instance: {raw[:200]!r}") from exc


@dataclass(slots=True)
class _Registration:
    """One registered instance: its lease, and the task keeping that lease alive.

    The keepalive task ends only when it finds the lease gone, so a finished task means
    "re-grant on the next register".
    """

    value: bytes
    lease: int
    keepalive: asyncio.Task[None]

    @property
    def healthy(self) -> bool:
        return not self.keepalive.done()


class _Backoff:
    """Exponential delays with equal jitter: spread out reconnects, never a hot loop."""

    def __init__(self) -> None:
        self._delay = _RELIST_BACKOFF_FIRST

    def reset(self) -> None:
        self._delay = _RELIST_BACKOFF_FIRST

    async def sleep(self) -> None:
        await asyncio.sleep(random.uniform(self._delay / 2, self._delay))
        self._delay = min(self._delay * 2, _RELIST_BACKOFF_MAX)


class EtcdRegistry:
    """Service registry on etcd leases; satisfies :class:`~ordermesh_shared.discovery.Registry`.

    >>> async with EtcdRegistry("http://127.0.0.1:2379", ttl=3.0) as registry:
    ...     await registry.register(me)       # cheap when already registered: call it every second
    ...     await registry.watch("payment")   # then registry.instances("payment") reads the cache

    Errors reaching etcd surface as :class:`RegistryError`; background work (keepalives,
    watches) retries on its own and stops when the registry is left.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 3.0,
        prefix: str = "/ordermesh/services/",
        timeout: float = 2.0,
    ) -> None:
        self._etcd = EtcdClient(url, timeout=timeout)
        self._ttl = ttl
        self._prefix = prefix if prefix.endswith("/") else f"{prefix}/"
        self._registrations: dict[str, _Registration] = {}
        self._register_lock = asyncio.Lock()
        self._watch_lock = asyncio.Lock()
        self._caches: dict[str, dict[str, ServiceInstance]] = {}
        self._snapshots: dict[str, tuple[ServiceInstance, ...]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        await self._etcd.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._stop_tasks()
            await self._revoke_remaining()
        finally:
            await self._etcd.aclose()

    # -- announcing ourselves -------------------------------------------------------------

    async def register(self, instance: ServiceInstance) -> None:
        """Announce ``instance``; without any I/O when it is registered and its lease is fine."""
        key, value = self._key(instance), encode_instance(instance)
        async with self._register_lock:
            current = self._registrations.get(key)
            if current is not None and current.healthy:
                if current.value != value:  # same instance id, new address or metadata
                    await self._guarded(self._etcd.put(key, value, lease=current.lease))
                    current.value = value
                return
            if current is not None:
                await self._forget(key)
            await self._register_new(key, value, healing=current is not None)

    async def deregister(self, instance: ServiceInstance) -> None:
        """Withdraw ``instance`` at once by revoking its lease (a no-op if not registered)."""
        key = self._key(instance)
        async with self._register_lock:
            registration = await self._forget(key)
        if registration is None:
            return
        try:
            await self._etcd.lease_revoke(registration.lease)
        except LeaseNotFound:
            pass  # already expired: the key is gone, which is what we want
        except EtcdError as exc:
            raise RegistryError(
                f"could not withdraw {key} ({exc}); it disappears within {self._ttl} s anyway"
            ) from exc
        log.info("registry.deregistered", key=key)

    async def _register_new(self, key: str, value: bytes, *, healing: bool) -> None:
        lease = await self._guarded(self._etcd.lease_grant(max(1, math.ceil(self._ttl))))
        try:
            await self._guarded(self._etcd.put(key, value, lease=lease))
        except RegistryError:
            await self._revoke_quietly(lease)
            raise
        keepalive = self._spawn(self._keep_alive(key, lease), name=f"keepalive {key}")
        self._registrations[key] = _Registration(value, lease, keepalive)
        log.info("registry.registered", key=key, lease=f"{lease:x}", ttl=self._ttl, healed=healing)

    async def _keep_alive(self, key: str, lease: int) -> None:
        """Renew the lease every ttl/3 until it is found gone; the next register re-grants."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self._etcd.lease_keepalive(lease)
            except LeaseNotFound:
                log.warning("registry.lease_lost", key=key, lease=f"{lease:x}")
                return
            except EtcdError as exc:
                # Keep trying: etcd keeps leases across its restarts, so ours may well survive.
                log.warning("registry.keepalive_failed", key=key, error=str(exc))

    async def _forget(self, key: str) -> _Registration | None:
        registration = self._registrations.pop(key, None)
        if registration is not None:
            await _cancel_and_wait(registration.keepalive)
        return registration

    async def _revoke_remaining(self) -> None:
        """Leaving the registry withdraws what is still registered, rather than waiting a TTL."""
        for key in list(self._registrations):
            registration = await self._forget(key)
            if registration is not None:
                await self._revoke_quietly(registration.lease)

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            await self._etcd.lease_revoke(lease)
        except EtcdError as exc:
            log.warning("registry.revoke_failed", lease=f"{lease:x}", error=str(exc))

    # -- finding others -------------------------------------------------------------------

    async def watch(self, service: str) -> None:
        """Cache ``service``'s instances now and keep the cache current in the background."""
        async with self._watch_lock:
            if service in self._caches:
                return
            revision = await self._guarded(self._relist(service))
            self._spawn(self._follow(service, revision), name=f"watch {service}")
            log.info("registry.watch_started", service=service, instances=self._count(service))

    def instances(self, service: str) -> Sequence[ServiceInstance]:
        """The cached instances of ``service``, sorted by instance id; empty if not watched.

        While etcd is unreachable this is the last known set (stale beats empty for callers
        that can still reach those instances); it is replaced by a fresh listing on recovery.
        """
        return self._snapshots.get(service, ())

    async def ping(self) -> None:
        """Raise RegistryError if etcd cannot be reached (a readiness check)."""
        await self._guarded(self._etcd.get(self._prefix))

    async def _relist(self, service: str) -> int:
        """Replace the cache with a fresh listing; returns the revision it reflects."""
        kvs, revision = await self._etcd.get_prefix(self._service_prefix(service))
        self._caches[service] = {kv.key: i for kv in kvs if (i := self._decode(kv)) is not None}
        self._publish(service)
        return revision

    async def _follow(self, service: str, revision: int) -> None:
        """Apply watch events forever; when the stream breaks, re-list and watch again.

        Events between the listing and the watch are not lost: the watch starts at the
        revision right after the one the listing reflects.
        """
        prefix, backoff = self._service_prefix(service), _Backoff()
        while True:
            try:
                async for batch in self._etcd.watch_prefix(prefix, start_revision=revision + 1):
                    self._apply(service, batch)
                    backoff.reset()  # the stream worked, so a later break starts afresh
            except EtcdError as exc:
                log.warning("registry.watch_broken", service=service, error=str(exc))
            revision = await self._relist_with_backoff(service, backoff)

    async def _relist_with_backoff(self, service: str, backoff: _Backoff) -> int:
        while True:
            await backoff.sleep()
            try:
                revision = await self._relist(service)
            except EtcdError as exc:
                log.warning("registry.relist_failed", service=service, error=str(exc))
                continue
            log.info("registry.relisted", service=service, instances=self._count(service))
            return revision

    def _apply(self, service: str, batch: WatchBatch) -> None:
        cache = self._caches[service]
        for event in batch.events:
            if event.type is EventType.DELETE:
                cache.pop(event.kv.key, None)
            elif (instance := self._decode(event.kv)) is not None:
                cache[event.kv.key] = instance
        self._publish(service)

    def _publish(self, service: str) -> None:
        # Readers get an immutable snapshot, rebuilt on change rather than on every read.
        cache = self._caches[service]
        self._snapshots[service] = tuple(sorted(cache.values(), key=lambda i: i.instance_id))

    def _decode(self, kv: KeyValue) -> ServiceInstance | None:
        try:
            return decode_instance(kv.value)
        except ValueError as exc:
            log.warning("registry.bad_instance", key=kv.key, error=str(exc))
            return None

    # -- plumbing -------------------------------------------------------------------------

    def _key(self, instance: ServiceInstance) -> str:
        return f"{self._service_prefix(instance.service)}{instance.instance_id}"

    def _service_prefix(self, service: str) -> str:
        return f"{self._prefix}{service}/"

    def _count(self, service: str) -> int:
        return len(self._snapshots.get(service, ()))

    async def _guarded(self, call: Coroutine[Any, Any, T]) -> T:
        """Await an etcd call, translating its errors into the port's RegistryError."""
        try:
            return await call
        except EtcdUnavailable as exc:
            raise RegistryError(str(exc)) from exc  # already names the URL and what to check
        except EtcdError as exc:
            raise RegistryError(f"etcd at {self._etcd.url}: {exc}") from exc

    def _spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("registry.task_failed", task=task.get_name(), exc_info=exc)

    async def _stop_tasks(self) -> None:
        for task in list(self._tasks):
            await _cancel_and_wait(task)


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])
