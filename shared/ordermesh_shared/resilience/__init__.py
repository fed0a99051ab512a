"""Resilient calls between services: :class:`ServiceClient` and what it is built from.

>>> async with ServiceClient(registry, metrics=metrics.registry) as clients:
...     answer = await clients.payment.post("/payments", json=charge, idempotency_key=key)
...     answer.status, answer.json()

Errors: :mod:`ordermesh_shared.resilience.errors`. Deadlines: :mod:`.deadline`.
"""

from ordermesh_shared.resilience.client import (
    ClientPolicy,
    InstanceSource,
    ServiceClient,
    TargetService,
)
from ordermesh_shared.resilience.deadline import (
    DEADLINE_HEADER,
    DeadlineMiddleware,
    deadline_scope,
    own_deadline,
    remaining,
    without_deadline,
)
from ordermesh_shared.resilience.errors import (
    CircuitOpen,
    DeadlineExceeded,
    RetryBudgetExhausted,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    install_upstream_error_handlers,
)
from ordermesh_shared.resilience.static import StaticInstances
from ordermesh_shared.resilience.transport import AiohttpEngine, HttpxEngine, UpstreamResponse

__all__ = [
    "DEADLINE_HEADER",
    "AiohttpEngine",
    "CircuitOpen",
    "ClientPolicy",
    "DeadlineExceeded",
    "DeadlineMiddleware",
    "HttpxEngine",
    "InstanceSource",
    "RetryBudgetExhausted",
    "ServiceClient",
    "StaticInstances",
    "TargetService",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamResponse",
    "UpstreamUnavailable",
    "deadline_scope",
    "install_upstream_error_handlers",
    "own_deadline",
    "remaining",
    "without_deadline",
]
