"""JSON logs through structlog, every line stamped with the service and instance id, and
with ``trace_id`` and ``span_id`` when written inside a span (tracing on).

>>> configure_logging(service="order", instance_id="order-127.0.0.1-8000", level="INFO")
>>> structlog.get_logger(__name__).info("order.created", order_id=str(order_id))
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from opentelemetry import trace


def configure_logging(*, service: str, instance_id: str, level: str = "INFO") -> None:
    """Route structlog and the standard library (uvicorn, asyncpg...) into one JSON stream."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _stamp(service=service, instance_id=instance_id),
        add_trace_ids,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Access lines would double the log volume; request metrics cover them.
    logging.getLogger("uvicorn.access").disabled = True
    # One line per etcd keepalive or watch poll would drown the service's own events.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _stamp(*, service: str, instance_id: str) -> structlog.types.Processor:
    def add_identity(
        _logger: object, _name: str, event: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        event.setdefault("service", service)
        event.setdefault("instance", instance_id)
        return event

    return add_identity


def add_trace_ids(
    _logger: object, _name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """``trace_id`` and ``span_id`` of the current span, as a trace backend shows them (hex),
    so a log line leads to its trace and back; nothing outside a sampled span."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


@contextmanager
def order_bound(order_id: object) -> Iterator[None]:
    """Every line logged inside (the handler's, the SQL errors', the client's) names the
    order, as the order service's saga lines do with ``saga_id``:

    >>> with order_bound(body.order_id):
    ...     return await run_command(ctx.db, key, fingerprint(request, body), command)
    """
    with structlog.contextvars.bound_contextvars(order_id=str(order_id)):
        yield
