"""DNS backend of the :class:`~ordermesh_shared.discovery.base.Registry` port: SRV lookups.

Discovery asks a DNS server for ``<service><suffix>.<domain>`` SRV records (Consul's DNS
interface answers ``payment.service.consul``; a Kubernetes headless Service ``payment-peers``
answers ``_http._tcp.payment-peers.<namespace>.svc.cluster.local`` when ``port_name="http"``
and ``name_suffix="-peers"``) and takes each
target's address from the answer's additional A/AAAA records, or asks for them when the server
left them out. Queries go over TCP: Consul trims UDP answers to three random records, which
would hide the other instances.

DNS is lookup-only. Registration is somebody else's job: a ``registrar`` (the Consul HTTP API,
:class:`~ordermesh_shared.discovery.consul.ConsulRegistry`) or the platform itself (Kubernetes
publishes a ready pod's address; ``registrar=None`` makes register/deregister no-ops).

**DNS is an AP system here.** There is no watch stream: an answer is cached for its TTL
(raised to ``min_ttl`` so a TTL of 0, Consul's default, is no busy loop; capped at
``max_ttl``) and asked again when it expires. An instance that dies stays in every caller's
list until then; callers' retries and breakers cover that window. When the DNS server cannot
be reached the last answer is kept (stale but available) and asked again with backoff.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass
from typing import Protocol, Self

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.rrset
import structlog

from ordermesh_shared.discovery.base import RegistryError, ServiceInstance

log = structlog.get_logger(__name__)

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0


class Registrar(Protocol):
    """Where instances are registered when DNS only reads (e.g. a ConsulRegistry)."""

    async def __aenter__(self) -> object: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def register(self, instance: ServiceInstance) -> None: ...

    async def deregister(self, instance: ServiceInstance) -> None: ...

    async def ping(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Lookup:
    """One answered lookup: the instances and how long the answer may be cached."""

    instances: tuple[ServiceInstance, ...]
    ttl: float


def split_server(server: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``, or a bare host for port 53) as ``(host, port)``."""
    host, sep, port = server.rpartition(":")
    if not sep or (":" in host and not host.startswith("[")):
        return server.strip("[]"), 53  # a bare host, or a bare IPv6 address
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"DNS server must look like 127.0.0.1:8600, got {server!r}")
    return host.strip("[]"), int(port)


def instance_id(service: str, host: str, port: int) -> str:
    # DNS carries no instance id: this is the id a service gives itself by default
    # (INSTANCE_ID unset), so both sides of a Consul registration name it alike.
    return f"{service}-{host}-{port}"


def _addresses(response: dns.message.Message) -> dict[dns.name.Name, list[str]]:
    found: dict[dns.name.Name, list[str]] = {}
    for rrset in response.additional:
        if rrset.rdtype in _ADDRESS_TYPES:
            found.setdefault(rrset.name, []).extend(rdata.address for rdata in rrset)
    return found


def _address_ttls(response: dns.message.Message) -> list[int]:
    return [rrset.ttl for rrset in response.additional if rrset.rdtype in _ADDRESS_TYPES]


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: an NXDOMAIN is cached for the smaller of its SOA's TTL and minimum."""
    for rrset in response.authority if response is not None else ():
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


class _Backoff:
    """Exponential delays drawn from their upper half: never near zero, never in step."""

    def __init__(self) -> None:
        self._delay = _BACKOFF_FIRST

    def next_delay(self) -> float:
        delay, self._delay = self._delay, min(self._delay * 2, _BACKOFF_MAX)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._delay = _BACKOFF_FIRST


class DnsRegistry:
    """Registry that finds instances through SRV records and caches each answer for its TTL.

    >>> async with DnsRegistry("127.0.0.1:8600", registrar=ConsulRegistry(url)) as registry:
    ...     await registry.register(me)        # goes to the registrar (no-op without one)
    ...     await registry.watch("payment")    # first lookup now, then again at each TTL
    ...     registry.instances("payment")      # cache read, no I/O; stale for up to a TTL

    ``server`` is ``host:port`` (a host name is resolved once, on entry); empty means the
    system's resolvers (``/etc/resolv.conf``, as in a Kubernetes pod). ``timeout`` bounds each
    lookup in seconds. ``name_suffix`` is appended to the service's name in the query only
    (a headless Service beside the ClusterIP one needs a name of its own). Instances get the id
    ``<service>-<host>-<port>`` and no metadata.
    """

    def __init__(
        self,
        server: str = "",
        *,
        domain: str = "service.consul",
        port_name: str = "",
        name_suffix: str = "",
        registrar: Registrar | None = None,
        timeout: float = 2.0,
        min_ttl: float = 1.0,
        max_ttl: float = 60.0,
    ) -> None:
        self._server = split_server(server) if server else None
        if timeout <= 0 or not 0 < min_ttl <= max_ttl:
            raise ValueError("timeout must be > 0 and 0 < min_ttl <= max_ttl")
        self._domain = dns.name.from_text(domain)
        self._port_name = port_name
        self._name_suffix = name_suffix
        self._registrar = registrar
        self._timeout = timeout
        self._ttl_bounds = (min_ttl, max_ttl)
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._cache: dict[str, tuple[ServiceInstance, ...]] = {}
        self._refreshers: dict[str, asyncio.Task[None]] = {}
        self._watch_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        if self._resolver is not None:
            raise RuntimeError("DnsRegistry is already open")
        resolver = await self._make_resolver()
        if self._registrar is not None:
            await self._registrar.__aenter__()
        self._resolver = resolver
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        refreshers, self._refreshers = list(self._refreshers.values()), {}
        for task in refreshers:
            task.cancel()
        await asyncio.gather(*refreshers, return_exceptions=True)
        self._resolver = None
        if self._registrar is not None:
            await self._registrar.__aexit__(*exc_info)

    async def register(self, instance: ServiceInstance) -> None:
        """Hand ``instance`` to the registrar; a no-op where the platform publishes it."""
        if self._registrar is not None:
            await self._registrar.register(instance)

    async def deregister(self, instance: ServiceInstance) -> None:
        """Withdraw ``instance`` through the registrar; callers' caches keep it for a TTL."""
        if self._registrar is not None:
            await self._registrar.deregister(instance)

    async def watch(self, service: str) -> None:
        """Look ``service`` up now and again each time the answer's TTL runs out."""
        async with self._watch_lock:
            if service in self._refreshers:
                return
            lookup = await self.lookup(service)
            self._store(service, lookup.instances)
            self._refreshers[service] = asyncio.create_task(
                self._refresh(service, lookup.ttl), name=f"dns-refresh-{service}"
            )

    def instances(self, service: str) -> tuple[ServiceInstance, ...]:
        """The instances of the last answer for ``service`` (empty if not watched)."""
        return self._cache.get(service, ())

    async def ping(self) -> None:
        """Raise :class:`RegistryError` unless the DNS server (and the registrar) answer."""
        try:
            await self._query(self._domain, dns.rdatatype.SOA)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            pass  # an answer, even a negative one, is all readiness needs to know
        except dns.exception.DNSException as exc:
            raise self._error("a readiness query", exc) from exc
        if self._registrar is not None:
            await self._registrar.ping()

    async def lookup(self, service: str) -> Lookup:
        """Ask the DNS server for ``service``'s instances now (no cache)."""
        qname = self._qname(service)
        try:
            answer = await self._query(qname, dns.rdatatype.SRV)
        except dns.resolver.NXDOMAIN as exc:
            # Consul's answer for a service with no healthy instance, too: empty, not an error.
            return Lookup((), self._clamp(_negative_ttl(exc.kwargs["responses"].get(qname))))
        except dns.exception.DNSException as exc:
            raise self._error(f"an SRV query for {qname}", exc) from exc
        return await self._instances_from(service, answer)

    # -- lookups ---------------------------------------------------------------------------

    async def _make_resolver(self) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=self._server is None)
        if self._server is not None:
            host, port = self._server
            resolver.nameservers = [await _ip_of(host, port)]
            resolver.port = port
        resolver.lifetime = self._timeout
        resolver.cache = None  # this registry caches, by its own TTL rules
        return resolver

    def _qname(self, service: str) -> dns.name.Name:
        name = service + self._name_suffix
        labels = [f"_{self._port_name}", "_tcp", name] if self._port_name else [name]
        return dns.name.Name(labels).concatenate(self._domain)

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer:
        if self._resolver is None:
            raise RuntimeError("use DnsRegistry inside 'async with'")
        return await self._resolver.resolve(
            qname, rdtype, tcp=True, search=False, raise_on_no_answer=False
        )

    async def _instances_from(self, service: str, answer: dns.resolver.Answer) -> Lookup:
        addresses = _addresses(answer.response)
        ttls = [answer.rrset.ttl] if answer.rrset is not None else []
        ttls += _address_ttls(answer.response)
        found: list[ServiceInstance] = []
        for srv in answer.rrset or ():
            if srv.target not in addresses:
                addresses[srv.target], ttl = await self._resolve_target(srv.target)
                ttls.append(ttl)
            found += (
                ServiceInstance(service, instance_id(service, host, srv.port), host, srv.port)
                for host in addresses[srv.target]
            )
        unique = {i.instance_id: i for i in found}
        instances = tuple(sorted(unique.values(), key=lambda i: i.instance_id))
        return Lookup(instances, self._clamp(min(ttls, default=0)))

    async def _resolve_target(self, target: dns.name.Name) -> tuple[list[str], int]:
        """The addresses of an SRV target the server did not put in the additional section."""
        try:
            answer = await self._query(target, dns.rdatatype.A)
        except dns.resolver.NXDOMAIN:
            return [], 0
        except dns.exception.DNSException as exc:
            raise self._error(f"an A query for {target}", exc) from exc
        if answer.rrset is None:
            return [], 0
        return [rdata.address for rdata in answer.rrset], answer.rrset.ttl

    def _clamp(self, ttl: float) -> float:
        low, high = self._ttl_bounds
        return min(max(ttl, low), high)

    # -- the refresh loop ------------------------------------------------------------------

    async def _refresh(self, service: str, ttl: float) -> None:
        backoff = _Backoff()
        delay = ttl
        while True:
            await asyncio.sleep(delay)
            try:
                lookup = await self.lookup(service)
            except RegistryError as exc:
                # Stale beats empty: keep the last answer and ask again soon.
                log.warning("dns.lookup_failed", service=service, error=str(exc))
                delay = backoff.next_delay()
                continue
            backoff.reset()
            self._store(service, lookup.instances)
            delay = lookup.ttl

    def _store(self, service: str, instances: tuple[ServiceInstance, ...]) -> None:
        before = self._cache.get(service)
        self._cache[service] = instances
        if before != instances:
            ids = [i.instance_id for i in instances]
            log.info("dns.instances_changed", service=service, instances=ids)

    def _error(self, action: str, exc: dns.exception.DNSException) -> RegistryError:
        where = (
            "the system's resolvers" if self._server is None else ":".join(map(str, self._server))
        )
        if isinstance(exc, dns.exception.Timeout):
            reason = f"no answer within {self._timeout:g}s"
        else:
            reason = str(exc) or type(exc).__name__
        return RegistryError(
            f"DNS server at {where} failed {action}: {reason}; is it running on that address?"
        )


async def _ip_of(host: str, port: int) -> str:
    """The address of a DNS server named by host (e.g. ``consul`` on a compose network)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RegistryError(f"cannot resolve the DNS server's name {host!r}: {exc}") from exc
    return str(infos[0][4][0])
