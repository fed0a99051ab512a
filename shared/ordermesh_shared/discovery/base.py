"""The registry port: how a service announces itself and finds its peers.

Three backends satisfy :class:`Registry` without inheriting from it:
:class:`~ordermesh_shared.discovery.etcd.EtcdRegistry` (lease-backed keys, the default
where Consul is not installed), :class:`~ordermesh_shared.discovery.consul.ConsulRegistry`
(agent registration with an HTTP check, the default in docker compose) and
:class:`~ordermesh_shared.discovery.dns.DnsRegistry` (SRV lookups, stale for up to their TTL;
registration left to Consul or the platform).

Resolution never makes a network round trip: :meth:`Registry.instances` reads a local cache
that a background watch (etcd), blocking query (Consul) or TTL-timed lookup (DNS) keeps
current.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One running instance of a service, as the registry knows it.

    >>> inst = ServiceInstance("payment", "payment-1", host="127.0.0.1", port=8002)
    >>> inst.base_url
    'http://127.0.0.1:8002'
    """

    service: str
    instance_id: str
    host: str
    port: int
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def base_url(self) -> str:
        """The URL prefix for HTTP calls to this instance."""
        return f"http://{self.host}:{self.port}"


class RegistryError(Exception):
    """The registry could not be reached or refused a request; the message says what to check."""


class Registry(Protocol):
    """Where instances announce themselves and find each other.

    A registry is an async context manager that owns its background work (lease keepalives,
    watches, blocking queries); leaving the context stops it.

    >>> async with EtcdRegistry(settings.etcd_url) as registry:
    ...     await registry.register(me)                # idempotent; call again when ready again
    ...     await registry.watch("payment")            # start caching healthy payment instances
    ...     registry.instances("payment")              # local cache read, no I/O
    """

    async def __aenter__(self) -> Registry: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def register(self, instance: ServiceInstance) -> None:
        """Announce a ready instance (idempotent: also the periodic "still ready" heartbeat)."""
        ...

    async def deregister(self, instance: ServiceInstance) -> None:
        """Withdraw an instance at once (shutdown, or no longer ready)."""
        ...

    async def watch(self, service: str) -> None:
        """Start keeping the cache of ``service``'s healthy instances current.

        Returns once the first snapshot is in the cache; idempotent.
        """
        ...

    def instances(self, service: str) -> Sequence[ServiceInstance]:
        """The healthy instances of ``service`` from the local cache (empty if not watched)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`RegistryError` if the registry cannot be reached (readiness check)."""
        ...
