"""The DNS phase of ``make demo-cap``: an instance dies, and two views of membership differ.

DNS is the chapter's example of an AP system: a resolver answers from what it cached, and
that answer may be wrong for as long as the record's TTL. The registry the services use by
default is watch-fed (Consul's blocking queries, etcd's watches): a change reaches every
cache about one round trip after the health check sees it. Here both views of one service
are read side by side from the compose stack's Consul, the HTTP API for the watch and the
DNS interface (``127.0.0.1:8600``, records with a 5 s TTL) for the SRV lookups, while one of
its instances is killed and kept down, then started again:

      t s  watch-fed (blocking query)   DNS (SRV, cached for its TTL)
      0.5  payment-1                    payment-1
      1.5  -                            payment-1     <- stale: callers would still pick it
      5.1  -                            -

The local stack registers in etcd, which answers no DNS: the phase runs on compose only.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ordermesh_shared.discovery import Registry
from ordermesh_shared.discovery.consul import ConsulRegistry
from ordermesh_shared.discovery.dns import DnsRegistry

from ordermesh_deploy import stacks

SERVICE = "payment"  # a participant: nothing waits on it once the demo's load has stopped
STEP = 0.5  # seconds between rows
WITHIN = 20.0  # seconds each half (gone, back) may take before the phase gives up
CONSUL_HTTP, CONSUL_DNS = 8500, 8600  # the consul container's ports
HEADER = f"  t s  {'watch-fed (blocking query)':<28} DNS (SRV, cached for its TTL)"
SKIPPED_LOCAL = (
    "DNS phase: compose only (the local stack registers in etcd, which answers no DNS;"
    " TARGET=compose shows it)"
)

View = Callable[["Sample"], tuple[str, ...]]


@dataclass(frozen=True)
class Sample:
    """Both views at one moment: the instances (by container name) each one holds."""

    at: float  # seconds after the kill
    watched: tuple[str, ...]
    resolved: tuple[str, ...]


def watched(sample: Sample) -> tuple[str, ...]:
    return sample.watched


def resolved(sample: Sample) -> tuple[str, ...]:
    return sample.resolved


def dropped_at(samples: list[Sample], instance: str, view: View) -> float | None:
    """When ``view`` stopped holding ``instance`` for good (None: it still holds it)."""
    for index, sample in enumerate(samples):
        if all(instance not in view(later) for later in samples[index:]):
            return sample.at
    return None


@dataclass(frozen=True)
class Outcome:
    """When each view dropped the dead instance, in seconds after the kill (None: never)."""

    instance: str
    watch_dropped: float | None
    dns_dropped: float | None

    @classmethod
    def of(cls, samples: list[Sample], instance: str) -> Outcome:
        return cls(
            instance,
            dropped_at(samples, instance, watched),
            dropped_at(samples, instance, resolved),
        )

    @property
    def ok(self) -> bool:
        """Both dropped it, DNS no sooner than the watch (it answers from its cache)."""
        watch, dns = self.watch_dropped, self.dns_dropped
        return watch is not None and dns is not None and dns >= watch

    def summary(self) -> str:
        if self.watch_dropped is None or self.dns_dropped is None:
            return f"DNS phase: {self.instance} was not dropped by both views within {WITHIN:g} s"
        return (
            f"{self.instance} killed: the watch-fed cache dropped it after"
            f" {self.watch_dropped:.1f} s, DNS after {self.dns_dropped:.1f} s"
            f" (stale {self.dns_dropped - self.watch_dropped:.1f} s longer: the record's TTL)"
        )


def render(sample: Sample, instance: str) -> str:
    watch, dns = (" ".join(names) or "-" for names in (sample.watched, sample.resolved))
    if instance in sample.resolved and instance not in sample.watched:
        note = "   <- DNS stale: callers would still pick it"
    elif instance in sample.watched and instance not in sample.resolved:
        note = "   <- DNS stale: callers do not know it yet"
    else:
        note = ""
    return f"{sample.at:5.1f}  {watch:<28} {dns:<28}{note}".rstrip()


# --- reading both views ------------------------------------------------------------------------


class Views:
    """The watch-fed and the DNS registry of one service, named by container."""

    def __init__(self, watch: Registry, dns: Registry, stack: stacks.ComposeEndpoints) -> None:
        self._watch, self._dns = watch, dns
        self._names: dict[str, str] = {}  # an instance's host (its container's address) -> name
        self.rename(stack)

    def rename(self, stack: stacks.ComposeEndpoints) -> None:
        """Learn the containers' addresses again (a container started again may get a new
        one)."""
        for container in stack.containers:
            if container.service == SERVICE:
                self._names.update((address, container.name) for address in container.addresses)

    def sample(self, since: float) -> Sample:
        return Sample(time.monotonic() - since, self._held(self._watch), self._held(self._dns))

    def _held(self, registry: Registry) -> tuple[str, ...]:
        hosts = (instance.host for instance in registry.instances(SERVICE))
        return tuple(sorted(self._names.get(host, host) for host in hosts))


@contextlib.asynccontextmanager
async def views(stack: stacks.ComposeEndpoints) -> AsyncIterator[Views]:
    consul_url = f"http://127.0.0.1:{stack.host_port('consul', CONSUL_HTTP)}"
    dns_server = f"127.0.0.1:{stack.host_port('consul', CONSUL_DNS)}"
    async with (
        ConsulRegistry(consul_url, wait="10s", min_refresh_interval=0.05) as watch,
        DnsRegistry(dns_server) as dns,
    ):
        await watch.watch(SERVICE)
        await dns.watch(SERVICE)  # the first lookup: its answer is cached for the whole TTL
        yield Views(watch, dns, stack)


async def rows_until(
    views: Views, done: Callable[[Sample], bool], *, since: float, instance: str
) -> list[Sample]:
    """A row every STEP s until ``done`` holds for one (or WITHIN s have passed)."""
    samples: list[Sample] = []
    ends = time.monotonic() + WITHIN
    while True:
        samples.append(views.sample(since))
        print(render(samples[-1], instance), flush=True)
        if done(samples[-1]) or time.monotonic() > ends:
            return samples
        await asyncio.sleep(STEP)


# --- the phase ---------------------------------------------------------------------------------


async def docker(*command: str) -> None:
    await asyncio.to_thread(
        subprocess.run, ["docker", *command], capture_output=True, check=True, timeout=60
    )


def victim_of(stack: stacks.ComposeEndpoints) -> stacks.Container:
    running = [c for c in stack.containers if c.service == SERVICE and c.state == "running"]
    if not running:
        raise stacks.StackError(f"no {SERVICE} container is running: make status")
    return min(running, key=lambda c: c.number)


async def phase(stack: stacks.ComposeEndpoints) -> Outcome:
    """Kill one instance with both views watching; start it again; when each dropped it."""
    victim = victim_of(stack)
    name = victim.name
    print(
        f"\nDNS vs watch: {name} is killed and kept down; each row is what a caller's"
        f" registry holds for {SERVICE}, through Consul's blocking queries and through DNS"
    )
    print(HEADER)
    async with views(stack) as both:
        killed = time.monotonic()
        await docker("kill", victim.id)
        try:
            samples = await rows_until(
                both, lambda s: name not in s.watched + s.resolved, since=killed, instance=name
            )
        finally:
            await docker("start", victim.id)
        print(f"      -- {name} started again")
        both.rename(stacks.ComposeEndpoints(stacks.project_containers(stack.project)))
        await rows_until(
            both, lambda s: name in s.watched and name in s.resolved, since=killed, instance=name
        )
    outcome = Outcome.of(samples, name)
    print(outcome.summary())
    return outcome
