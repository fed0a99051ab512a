"""The place-order saga: reserve stock -> charge payment -> create shipment -> commit stock.

Compensations run in reverse: cancel the shipment, refund the charge, release the stock.
Each call carries the idempotency key ``<order_id>:<step>`` (``:undo`` for compensations).

Creating the shipment is the pivot, the point of no return: once the goods are on their way
the order goes forward. ``commit_stock`` comes after it because it cannot be refused for a
good reason (it turns units this saga holds into units sold, and only this saga releases
them): an answer lost in an outage is retried until it goes through, instead of refunding a
customer whose parcel has left and releasing stock that was sold (which inventory refuses,
so the order would be parked).
"""

from __future__ import annotations

from ordermesh_shared.saga import SagaDefinition, Step, StepCall

from order import commands
from order.clients import OrderClients
from order.domain import Charged, PlaceOrder, Reserved, Shipped

SAGA_NAME = "place_order"


def place_order_saga(
    participants: OrderClients, *, step_timeout: float = 5.0
) -> SagaDefinition[PlaceOrder]:
    """The saga definition, bound to the participants' clients."""

    async def reserve(call: StepCall[PlaceOrder]) -> Reserved:
        return await participants.reserve_stock(call.input.order_id, call.input.lines, key=call.key)

    async def release(call: StepCall[PlaceOrder]) -> None:
        await participants.release_stock(call.input.order_id, key=call.key)

    async def charge(call: StepCall[PlaceOrder]) -> Charged:
        amount = call.results.get(Reserved).total
        order = call.input
        return await participants.charge(order.order_id, order.customer_id, amount, key=call.key)

    async def refund(call: StepCall[PlaceOrder]) -> None:
        await participants.refund(call.input.order_id, key=call.key)

    async def ship(call: StepCall[PlaceOrder]) -> Shipped:
        return await participants.ship(call.input.order_id, call.input.destination, key=call.key)

    async def cancel_shipment(call: StepCall[PlaceOrder]) -> None:
        await participants.cancel_shipment(call.input.order_id, key=call.key)

    async def commit(call: StepCall[PlaceOrder]) -> None:
        await participants.commit_stock(call.input.order_id, key=call.key)

    return SagaDefinition(
        SAGA_NAME,
        steps=(
            Step("reserve_stock", reserve, release, timeout=step_timeout, result=Reserved),
            Step("charge_payment", charge, refund, timeout=step_timeout, result=Charged),
            Step("create_shipment", ship, cancel_shipment, timeout=step_timeout, result=Shipped),
            Step("commit_stock", commit, None, timeout=step_timeout),
        ),
        encode=PlaceOrder.to_json,
        decode=PlaceOrder.from_json,
        on_finish=commands.finish,
        pivot="create_shipment",
    )
