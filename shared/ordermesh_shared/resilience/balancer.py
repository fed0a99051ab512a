"""Choosing the instance for each attempt: round robin or least outstanding, breakers first.

An instance whose breaker is open is never picked while another admits calls; an instance
already tried by the same call is picked again only when no other one is usable (so a retry
goes somewhere else when it can).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Literal

from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.resilience.breaker import CLOSED, InstanceBreaker

Strategy = Literal["round_robin", "least_outstanding"]


class Endpoint:
    """One instance as the client sees it: its address, breaker and calls in flight."""

    __slots__ = ("base_url", "breaker", "instance", "outstanding")

    def __init__(self, instance: ServiceInstance, breaker: InstanceBreaker) -> None:
        self.instance = instance
        self.base_url = instance.base_url
        self.breaker = breaker
        self.outstanding = 0


class NoUsableInstance(Exception):
    """No endpoint to pick: none known (``known`` is 0), or every breaker is open."""

    def __init__(self, known: int) -> None:
        super().__init__(f"{known} instance(s) known, none admits calls")
        self.known = known


class Balancer:
    """The endpoints of one service, kept in step with the registry's snapshot.

    >>> balancer = Balancer(make_breaker, strategy="least_outstanding")
    >>> endpoint = balancer.pick(registry.instances("payment"), tried=())
    >>> endpoint.outstanding += 1   # the caller counts its call in flight
    """

    def __init__(
        self,
        make_breaker: Callable[[ServiceInstance], InstanceBreaker],
        *,
        strategy: Strategy = "least_outstanding",
        on_drop: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self._make_breaker = make_breaker
        self._least_outstanding = strategy == "least_outstanding"
        self._on_drop = on_drop
        self._snapshot: Sequence[ServiceInstance] = ()
        self._by_instance: dict[ServiceInstance, Endpoint] = {}
        self._endpoints: list[Endpoint] = []
        self._next = 0

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        """The endpoints of the last snapshot, in the registry's order."""
        return self._endpoints

    def pick(
        self, instances: Sequence[ServiceInstance], *, tried: Collection[Endpoint]
    ) -> Endpoint:
        """The endpoint for the next attempt; NoUsableInstance if none admits a call."""
        if instances is not self._snapshot:
            self._sync(instances)
        endpoints = self._endpoints
        count = len(endpoints)
        start = self._next
        self._next = (start + 1) % count if count else 0
        best: Endpoint | None = None
        best_rank = (2, 0)
        for offset in range(count):
            endpoint = endpoints[(start + offset) % count]
            breaker = endpoint.breaker
            if breaker.state != CLOSED and not breaker.admits():
                continue
            # Untried beats tried; then fewer calls in flight; ties go round robin.
            load = endpoint.outstanding if self._least_outstanding else 0
            rank = (1 if endpoint in tried else 0, load)
            if rank < best_rank:
                best, best_rank = endpoint, rank
                if rank == (0, 0):
                    break
        if best is None:
            raise NoUsableInstance(count)
        return best

    def _sync(self, instances: Sequence[ServiceInstance]) -> None:
        # The registry hands out a new snapshot only when something changed: rebuild then,
        # keeping the endpoints (and breakers) of the instances that stayed.
        current: dict[ServiceInstance, Endpoint] = {}
        for instance in instances:
            endpoint = self._by_instance.get(instance)
            current[instance] = endpoint or Endpoint(instance, self._make_breaker(instance))
        for instance, endpoint in self._by_instance.items():
            if instance not in current and self._on_drop is not None:
                self._on_drop(endpoint)
        self._by_instance = current
        self._endpoints = list(current.values())
        self._snapshot = instances
