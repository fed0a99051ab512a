"""The transactional outbox: events written with the business transaction, relayed to RabbitMQ.

>>> from ordermesh_shared.outbox import add_event
>>> async with pool.acquire() as conn, conn.transaction():
...     await create_order(conn, order)
...     await add_event(conn, aggregate_type="order", aggregate_id=str(order.id),
...                     event_type="order_created", payload={"total": "89.00"})

Modules: :mod:`~ordermesh_shared.outbox.store` (SQL), :mod:`~ordermesh_shared.outbox.relay`
(:class:`OutboxRelay`), :mod:`~ordermesh_shared.messaging.publisher` (confirms, order, outages),
:mod:`~ordermesh_shared.outbox.metrics` (lag), :mod:`~ordermesh_shared.outbox.admin`
(quarantine endpoints), :mod:`~ordermesh_shared.outbox.wiring` (what bootstrap starts).
"""

from ordermesh_shared.outbox.store import NotInTransaction, add_event

__all__ = ["NotInTransaction", "add_event"]
