"""What the order service adds to the shared context: its saga engine, settings and catalogue."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ordermesh_shared.bootstrap import ServiceContext
from ordermesh_shared.saga import SagaDefinition, SagaEngine
from prometheus_client import CollectorRegistry, Counter

from order.catalogue import CatalogueView
from order.domain import PlaceOrder


class SagaAdmission:
    """Bounds the sagas this instance runs: those running (the engine's ``in_flight``) plus
    those being created, so that overload is refused at the door instead of queueing into
    deadlines and compensations.

    >>> admission = SagaAdmission(engine, limit=64, registry=ctx.metrics.registry)
    >>> if not admission.full:
    ...     with admission.creating(): written = await store.place_order(..., saga=prepared)
    """

    def __init__(self, engine: SagaEngine, *, limit: int, registry: CollectorRegistry) -> None:
        self.limit = limit
        self._engine = engine
        self._creating = 0
        self.shed = Counter(
            "order_placements_shed_total",
            "POST /orders answered 429: the instance ran its MAX_IN_FLIGHT_SAGAS.",
            registry=registry,
        )

    @property
    def full(self) -> bool:
        """True when no new saga may start here now."""
        return self._engine.in_flight + self._creating >= self.limit

    @contextmanager
    def creating(self) -> Iterator[None]:
        """Counts a saga against the limit while its rows are written, before it is launched
        (many requests await their transaction at once: checking ``in_flight`` alone would let
        them all through)."""
        self._creating += 1
        try:
            yield
        finally:
            self._creating -= 1


@dataclass(frozen=True)
class OrderRuntime:
    """The running saga engine, the bound saga definition, how long POST waits, how many
    sagas it admits, and the catalogue it quotes from."""

    engine: SagaEngine
    definition: SagaDefinition[PlaceOrder]
    wait: float
    admission: SagaAdmission
    catalogue: CatalogueView


def order_runtime(ctx: ServiceContext) -> OrderRuntime:
    """The order runtime the service's setup yielded (the bootstrap keeps it)."""
    runtime = ctx.service_state
    if not isinstance(runtime, OrderRuntime):
        raise RuntimeError("the order service's setup has not started (or is not order's)")
    return runtime
