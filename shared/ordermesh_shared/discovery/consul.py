"""Consul backend of the :class:`~ordermesh_shared.discovery.base.Registry` port.

Registration goes to the *local agent* with an HTTP check on the instance's
``/health/ready``: Consul itself decides whether the instance is healthy, so an instance
that hangs or dies leaves the passing list even if it never says goodbye, and one that stays
critical for ``deregister_critical_after`` is reaped by the agent.

Discovery is a ``/v1/health/service/<name>?passing`` blocking query per watched service,
run by a task the registry owns. The loop follows Consul's blocking-query guide: reset the
index when it goes backwards, never block on an index below 1, and rate-limit with a token
bucket so a churning service degrades to polling instead of a busy loop.

Every py-consul, aiohttp and timeout error is turned into :class:`RegistryError` here.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import warnings
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio
import structlog

from ordermesh_shared.discovery.base import RegistryError, ServiceInstance

log = structlog.get_logger(__name__)

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DEFAULT_PORTS = {"http": 8500, "https": 8501}
# Consul stretches every blocking query by up to wait/16 to spread wake-ups.
_JITTER_FRACTION = 16
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
_BURST = 2  # the guide's suggestion: a couple of quick deliveries, then rate-limit


def _seconds(duration: str) -> float:
    """Seconds in a Go duration such as ``"1s"``, ``"250ms"`` or ``"1m30s"`` (Consul's format)."""
    parts = _DURATION_PART.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"{duration!r} is not a Consul duration such as '1s', '500ms' or '1m30s'")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, by the rules of Consul's blocking-query guide."""
    if returned < previous:
        return 0  # went backwards (e.g. snapshot restore): start over with a plain read
    return max(returned, 1)  # an index of 0 would make every "blocking" query return at once


def _instance_from(entry: Mapping[str, Any]) -> ServiceInstance:
    service, node = entry["Service"], entry["Node"]
    return ServiceInstance(
        service=service["Service"],
        instance_id=service["ID"],
        # An empty service address means "the agent's node address", as in Consul's DNS.
        host=service.get("Address") or node["Address"],
        port=int(service["Port"]),
        meta={str(k): str(v) for k, v in (service.get("Meta") or {}).items()},
    )


def _parse_health(raw_index: Any, entries: Any) -> tuple[int, tuple[ServiceInstance, ...]]:
    try:
        instances = tuple(_instance_from(entry) for entry in entries or ())
        return int(raw_index), tuple(sorted(instances, key=lambda i: i.instance_id))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RegistryError(
            f"Consul answered a health query in an unexpected shape: {exc!r}"
        ) from exc


def _log_watch_failure(service: str, exc: Exception) -> None:
    if isinstance(exc, RegistryError):
        log.warning("consul.watch_failed", service=service, error=str(exc))
    else:
        # A bug must not end the watch and freeze the cache: say so loudly and carry on.
        log.error("consul.watch_crashed", service=service, exc_info=exc)


class _TokenBucket:
    """Lets ``burst`` queries through at once, then one per ``period`` seconds."""

    def __init__(self, *, burst: int, period: float) -> None:
        self._burst, self._period = burst, period
        self._tokens, self._stamp = float(burst), time.monotonic()

    async def take(self) -> None:
        self._refill()
        if self._tokens < 1:
            await asyncio.sleep((1 - self._tokens) * self._period)
            self._refill()
        self._tokens -= 1

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) / self._period)
        self._stamp = now


class _Backoff:
    """Exponential backoff, each delay drawn from its upper half: never near zero, never in step."""

    def __init__(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        cap = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**self._attempt)
        # Stop counting once at the ceiling: 2**n would overflow a float in a long outage.
        self._attempt = min(self._attempt + 1, 16)
        return random.uniform(cap / 2, cap)

    def reset(self) -> None:
        self._attempt = 0


@dataclass
class _Registration:
    instance: ServiceInstance
    meta: dict[str, str]
    verified_at: float

    def describes(self, instance: ServiceInstance) -> bool:
        # ServiceInstance equality ignores meta; a meta change must still re-register.
        return self.instance == instance and self.meta == instance.meta


class ConsulRegistry:
    """Registry backed by a local Consul agent: HTTP health checks and blocking queries.

    >>> async with ConsulRegistry("http://127.0.0.1:8500") as registry:
    ...     await registry.register(me)        # cheap to repeat: the agent is asked once
    ...     await registry.watch("payment")    # first snapshot now, then blocking queries
    ...     registry.instances("payment")      # cache read, no I/O

    Durations are Consul's strings (``"1s"``, ``"500ms"``). Consul raises check intervals
    below 1 s to 1 s and ``deregister_critical_after`` below 1 minute to 1 minute (its reaper
    runs every 30 s). ``timeout`` bounds every non-blocking call, in seconds; blocking queries
    get ``wait`` plus Consul's jitter on top. ``min_refresh_interval`` is the steady rate of
    the blocking loop once its burst of two is spent, and ``recheck_interval`` how often a
    repeated ``register`` asks the agent whether it still holds the registration.
    Leaving the context stops the watches and withdraws what this registry registered.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8500",
        *,
        check_interval: str = "1s",
        check_timeout: str = "1s",
        deregister_critical_after: str = "30s",
        wait: str = "30s",
        timeout: float = 5.0,
        min_refresh_interval: float = 1.0,
        recheck_interval: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"Consul URL must look like http://host:8500, got {url!r}")
        for duration in (check_interval, check_timeout, deregister_critical_after):
            _seconds(duration)  # fail at construction, not with a 400 at first registration
        if timeout <= 0 or min_refresh_interval <= 0 or recheck_interval < 0:
            raise ValueError("timeout and min_refresh_interval must be > 0, recheck_interval >= 0")
        self._url, self._scheme, self._host = url, parts.scheme, parts.hostname
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self._check = (check_interval, check_timeout, deregister_critical_after)
        self._wait = wait
        self._timeout = timeout
        self._blocking_timeout = _seconds(wait) * (1 + 1 / _JITTER_FRACTION) + timeout
        self._min_refresh_interval = min_refresh_interval
        self._recheck_interval = recheck_interval
        self._client: Any = None
        self._registered: dict[str, _Registration] = {}
        self._cache: dict[str, tuple[ServiceInstance, ...]] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._watch_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        if self._client is not None:
            raise RuntimeError("ConsulRegistry is already open")
        with warnings.catch_warnings():
            # py-consul 1.8 builds its aiohttp connector with arguments aiohttp 3.14 deprecates
            # (verify_ssl, ssl_context). Nothing we pass avoids it; silence exactly that here.
            warnings.filterwarnings(
                "ignore",
                message=r"(verify_ssl|ssl_context) is deprecated",
                category=DeprecationWarning,
                module=r"consul\.aio",
            )
            self._client = consul.aio.Consul(
                host=self._host,
                port=self._port,
                scheme=self._scheme,
                verify=True,
                # aiohttp's default 5-minute total would cut long blocking queries short.
                connections_timeout=self._blocking_timeout,
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        watches, self._watches = list(self._watches.values()), {}
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        try:
            await self._withdraw_all()
        finally:
            client, self._client = self._client, None
            await client.close()

    async def register(self, instance: ServiceInstance) -> None:
        """Register ``instance`` with an HTTP check on its ``/health/ready``; cheap to repeat."""
        try:
            if not await self._still_registered(instance):
                await self._put_registration(instance)
        except RegistryError:
            self._registered.pop(instance.instance_id, None)  # so the next call starts over
            raise

    async def deregister(self, instance: ServiceInstance) -> None:
        """Remove ``instance`` (and its check) from the agent; a no-op if the agent lacks it."""
        self._registered.pop(instance.instance_id, None)
        async with self._translated(f"deregistering {instance.instance_id!r}", self._timeout):
            # py-consul answers False for the 404 of an unknown ID: already gone is fine.
            await self._agent.agent.service.deregister(instance.instance_id)
        log.info("consul.deregistered", instance=instance.instance_id)

    async def watch(self, service: str) -> None:
        """Cache ``service``'s passing instances now and keep them current in the background."""
        async with self._watch_lock:
            if service in self._watches:
                return
            index, instances = await self._fetch(service, index=0)
            self._store(service, instances)
            self._watches[service] = asyncio.create_task(
                self._follow(service, _next_index(0, index)), name=f"consul-watch-{service}"
            )

    def instances(self, service: str) -> tuple[ServiceInstance, ...]:
        """The passing instances of ``service`` from the cache (empty if not watched)."""
        return self._cache.get(service, ())

    async def ping(self) -> None:
        """Raise :class:`RegistryError` unless the agent answers and its cluster has a leader."""
        async with self._translated("a status query", self._timeout):
            leader = await self._agent.status.leader()
        if not leader:
            raise RegistryError(
                f"Consul agent at {self._url} answers but its cluster has no leader: "
                "registrations and health queries will fail until the servers elect one"
            )

    @property
    def _agent(self) -> Any:
        if self._client is None:
            raise RuntimeError("use ConsulRegistry inside 'async with'")
        return self._client

    async def _still_registered(self, instance: ServiceInstance) -> bool:
        known = self._registered.get(instance.instance_id)
        if known is None or not known.describes(instance):
            return False
        if time.monotonic() - known.verified_at < self._recheck_interval:
            return True
        # The agent may have lost it (reaped while we were paused, agent data wiped...).
        async with self._translated("listing the agent's services", self._timeout):
            services = await self._agent.agent.services()
        if instance.instance_id not in (services or {}):
            log.warning("consul.registration_lost", instance=instance.instance_id)
            return False
        known.verified_at = time.monotonic()
        return True

    async def _put_registration(self, instance: ServiceInstance) -> None:
        interval, timeout, deregister_after = self._check
        check = consul.Check.http(
            instance.base_url + "/health/ready", interval, timeout, deregister_after
        )
        async with self._translated(f"registering {instance.instance_id!r}", self._timeout):
            accepted = await self._agent.agent.service.register(
                instance.service,
                service_id=instance.instance_id,
                address=instance.host,
                port=instance.port,
                meta=dict(instance.meta),
                check=check,
            )
        if not accepted:
            raise RegistryError(f"Consul agent at {self._url} refused {instance.instance_id!r}")
        self._registered[instance.instance_id] = _Registration(
            instance, dict(instance.meta), time.monotonic()
        )
        log.info("consul.registered", instance=instance.instance_id, service=instance.service)

    async def _withdraw_all(self) -> None:
        for registration in list(self._registered.values()):
            try:
                await self.deregister(registration.instance)
            except RegistryError as exc:
                # The check will turn critical and the agent reaps the instance anyway.
                log.warning("consul.withdraw_failed", error=str(exc))

    async def _follow(self, service: str, index: int) -> None:
        bucket = _TokenBucket(burst=_BURST, period=self._min_refresh_interval)
        backoff = _Backoff()
        while True:
            await bucket.take()
            try:
                returned, instances = await self._fetch(service, index=index)
            except Exception as exc:
                _log_watch_failure(service, exc)
                await asyncio.sleep(backoff.next_delay())
                index = 0  # after an outage, refill the cache at once with a plain read
                continue
            backoff.reset()
            self._store(service, instances)
            index = self._advance(service, index, returned)

    def _advance(self, service: str, index: int, returned: int) -> int:
        following = _next_index(index, returned)
        if following == 0:
            log.warning("consul.index_reset", service=service, previous=index, returned=returned)
        return following

    async def _fetch(self, service: str, *, index: int) -> tuple[int, tuple[ServiceInstance, ...]]:
        blocking = index > 0
        budget = self._blocking_timeout if blocking else self._timeout
        async with self._translated(f"a health query for {service!r}", budget):
            raw_index, entries = await self._agent.health.service(
                service,
                passing=True,
                index=index if blocking else None,
                wait=self._wait if blocking else None,
            )
        return _parse_health(raw_index, entries)

    def _store(self, service: str, instances: tuple[ServiceInstance, ...]) -> None:
        before = self._cache.get(service)
        self._cache[service] = instances
        if before is None or [(i, i.meta) for i in before] != [(i, i.meta) for i in instances]:
            ids = [i.instance_id for i in instances]
            log.info("consul.instances_changed", service=service, instances=ids)

    @asynccontextmanager
    async def _translated(self, action: str, budget: float) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(budget):
                yield
        except TimeoutError as exc:
            raise RegistryError(
                f"Consul agent at {self._url} did not answer {action} within {budget:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise RegistryError(
                f"Consul agent at {self._url} is unreachable ({action}): "
                f"{str(exc) or type(exc).__name__}; is the agent running on that address?"
            ) from exc
        except consul.ConsulException as exc:
            # py-consul raises these for the agent's 4xx/5xx answers: it was reached, and said no.
            raise RegistryError(f"Consul agent at {self._url} refused {action}: {exc}") from exc
