"""What the order service adds to the shared context: its saga engine and settings."""

from __future__ import annotations

from dataclasses import dataclass

from ordermesh_shared.bootstrap import ServiceContext
from ordermesh_shared.saga import SagaDefinition, SagaEngine

from order.domain import PlaceOrder

RUNTIME_KEY = "order"


@dataclass(frozen=True)
class OrderRuntime:
    """The running saga engine, the bound saga definition and how long POST waits."""

    engine: SagaEngine
    definition: SagaDefinition[PlaceOrder]
    wait: float


def order_runtime(ctx: ServiceContext) -> OrderRuntime:
    """The order runtime the lifespan put on the context."""
    runtime: OrderRuntime = ctx.extras[RUNTIME_KEY]
    return runtime
