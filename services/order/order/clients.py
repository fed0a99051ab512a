"""Typed calls to inventory, payment and shipping for the place-order saga.

A participant's 4xx answer is a business "no" and becomes :class:`StepFailed` with the
participant's ``reason`` (for a compensation too: a refused undo, repeated, parks the saga
for an operator); every other failure (unavailable, breaker open, deadline) is left to the
saga engine, which retries it with the same idempotency key.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal

from ordermesh_shared.resilience import ServiceClient, UpstreamRejected
from ordermesh_shared.saga import StepFailed

from order.domain import Charged, Line, Reserved, Shipped


@asynccontextmanager
async def business_errors(step: str) -> AsyncIterator[None]:
    """Turn a participant's 4xx into StepFailed(reason, detail)."""
    try:
        yield
    except UpstreamRejected as exc:
        body = exc.body if isinstance(exc.body, Mapping) else {}
        reason = str(body.get("reason") or f"{step}_rejected")
        detail = str(body.get("detail") or exc.detail)
        raise StepFailed(reason, detail) from exc


class OrderClients:
    """The participants, by what the saga asks of them."""

    def __init__(self, clients: ServiceClient) -> None:
        self._clients = clients

    async def reserve_stock(
        self, order_id: uuid.UUID, lines: tuple[Line, ...], *, key: str
    ) -> Reserved:
        """Reserve every line; returns the total and the unit prices."""
        items = [{"sku": line.sku, "quantity": line.quantity} for line in lines]
        body = {"order_id": str(order_id), "items": items}
        async with business_errors("reserve_stock"):
            answer = await self._clients.inventory.post(
                "/reservations", json=body, idempotency_key=key
            )
        reservation = answer.json()
        prices = {line["sku"]: Decimal(line["unit_price"]) for line in reservation["items"]}
        return Reserved(total=Decimal(reservation["total"]), prices=prices)

    async def release_stock(self, order_id: uuid.UUID, *, key: str) -> None:
        """Give the order's units back (compensation)."""
        async with business_errors("release_stock"):
            await self._clients.inventory.post(
                f"/reservations/{order_id}/release", idempotency_key=key
            )

    async def commit_stock(self, order_id: uuid.UUID, *, key: str) -> None:
        """Mark the order's units sold."""
        async with business_errors("commit_stock"):
            await self._clients.inventory.post(
                f"/reservations/{order_id}/commit", idempotency_key=key
            )

    async def charge(
        self, order_id: uuid.UUID, customer_id: str, amount: Decimal, *, key: str
    ) -> Charged:
        """Charge the customer; returns the payment id."""
        body = {"order_id": str(order_id), "customer_id": customer_id, "amount": str(amount)}
        async with business_errors("charge_payment"):
            answer = await self._clients.payment.post("/payments", json=body, idempotency_key=key)
        return Charged(uuid.UUID(answer.json()["id"]))

    async def refund(self, order_id: uuid.UUID, *, key: str) -> None:
        """Refund the order's charge (compensation)."""
        async with business_errors("refund"):
            await self._clients.payment.post(f"/payments/{order_id}/refund", idempotency_key=key)

    async def ship(self, order_id: uuid.UUID, destination: str, *, key: str) -> Shipped:
        """Create the shipment; returns its id."""
        body = {"order_id": str(order_id), "destination": destination}
        async with business_errors("create_shipment"):
            answer = await self._clients.shipping.post("/shipments", json=body, idempotency_key=key)
        return Shipped(uuid.UUID(answer.json()["id"]))

    async def cancel_shipment(self, order_id: uuid.UUID, *, key: str) -> None:
        """Cancel the order's shipment (compensation)."""
        async with business_errors("cancel_shipment"):
            await self._clients.shipping.post(
                f"/shipments/by-order/{order_id}/cancel", idempotency_key=key
            )
