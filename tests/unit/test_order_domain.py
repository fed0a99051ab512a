"""The order service's rules without a database: replays, statuses, the saga's contracts."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from order.domain import Line, PlaceOrder, PlaceOrderRequest, Reserved, order_status, replayed
from ordermesh_shared.idempotency import KeyReused
from ordermesh_shared.saga import SagaDefinition, Step

ORDER = uuid.uuid4()


def test_a_replay_of_the_same_request_names_the_first_order() -> None:
    assert replayed(ORDER, "f1", "f1", "k") == ORDER
    with pytest.raises(KeyReused, match="different order"):
        replayed(ORDER, "f1", "f2", "k")


@pytest.mark.parametrize(
    ("saga", "order"),
    [
        ("running", "pending"),
        ("compensating", "pending"),
        ("completed", "completed"),
        ("cancelled", "cancelled"),
        ("compensation_failed", "compensation_failed"),
    ],
)
def test_an_order_is_pending_until_its_saga_ends(saga: str, order: str) -> None:
    assert order_status(saga) == order


def test_the_saga_input_keeps_one_line_shape_and_survives_storage() -> None:
    request = PlaceOrderRequest.model_validate(
        {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": 2}], "destination": "DE"}
    )
    placed = PlaceOrder.from_request(ORDER, request)
    assert placed.lines == (Line("KB-101", 2),)
    assert PlaceOrder.from_json(placed.to_json()) == placed


def test_money_stays_decimal_through_the_reserved_result() -> None:
    async def nothing(_call: object) -> None:
        return None

    definition = SagaDefinition(
        "t",
        steps=(Step("reserve_stock", nothing, result=Reserved),),
        encode=PlaceOrder.to_json,
        decode=PlaceOrder.from_json,
    )
    reserved = Reserved(total=Decimal("10.10"), prices={"KB-101": Decimal("5.05")})
    stored = definition.encode_result(definition.steps[0], reserved)
    assert definition.decode_results(stored).get(Reserved) == reserved
