"""The order API end to end: real processes, real registry, real databases, public APIs only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.stack import RunningStack, wait_terminal

pytestmark = pytest.mark.e2e


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def place(
    http: httpx.AsyncClient, stack: RunningStack, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await http.post(f"{stack.url('order')}/orders", json=body, headers=headers)


async def placed(
    http: httpx.AsyncClient, stack: RunningStack, body: dict[str, Any]
) -> dict[str, Any]:
    response = await place(http, stack, body)
    assert response.status_code in (201, 202), response.text
    return await wait_terminal(http, stack.url("order"), response.json()["id"])


async def product(http: httpx.AsyncClient, stack: RunningStack, sku: str) -> dict[str, Any]:
    body: dict[str, Any] = (await http.get(f"{stack.url('inventory')}/products/{sku}")).json()
    return body


async def balance(http: httpx.AsyncClient, stack: RunningStack, customer: str) -> str:
    admin = {"X-Admin-Token": stack.admin_token}  # balances are private
    answer = await http.get(f"{stack.url('payment')}/customers/{customer}", headers=admin)
    return str(answer.json()["balance"])


def steps(order: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(s["step"], s["direction"], s["status"]) for s in order["steps"]]


async def test_happy_path_reaches_every_participant(
    http: httpx.AsyncClient, e2e_stack: RunningStack
) -> None:
    before = await product(http, e2e_stack, "CB-404")
    money = await balance(http, e2e_stack, "alice")
    response = await place(
        http,
        e2e_stack,
        {"customer_id": "alice", "items": [{"sku": "CB-404", "quantity": 3}], "destination": "NL"},
    )
    assert response.status_code == 201, response.text
    order = response.json()
    assert order["status"] == "completed"
    assert order["total"] == "29.97"
    (line,) = order["items"]
    assert (line["sku"], line["quantity"], line["unit_price"]) == ("CB-404", 3, "9.99")
    # Quoted from the catalogue replica, or not at all while the replica is still cold.
    assert line["quoted_price"] in ("9.99", None)
    assert order["price_changes"] == []
    assert response.headers["Location"].endswith(f"/orders/{order['id']}")
    assert [s[0] for s in steps(order)] == [
        "reserve_stock",
        "charge_payment",
        "create_shipment",
        "commit_stock",
    ]
    after = await product(http, e2e_stack, "CB-404")
    assert (after["available"], after["committed"]) == (
        before["available"] - 3,
        before["committed"] + 3,
    )
    assert float(await balance(http, e2e_stack, "alice")) == pytest.approx(float(money) - 29.97)
    shipment = (
        await http.get(f"{e2e_stack.url('shipping')}/shipments", params={"order_id": order["id"]})
    ).json()
    assert (shipment["status"], shipment["destination"]) == ("created", "NL")
    assert (await http.get(f"{e2e_stack.url('payment')}/payments/{order['id']}")).json()[
        "status"
    ] == "charged"


@pytest.mark.parametrize(
    ("body", "reason", "undone"),
    [
        (
            {
                "customer_id": "dave",
                "items": [{"sku": "KB-101", "quantity": 1}],
                "destination": "DE",
            },
            "insufficient_funds",
            ["reserve_stock"],
        ),
        (
            {
                "customer_id": "bob",
                "items": [{"sku": "KB-101", "quantity": 1}],
                "destination": "AQ",
            },
            "unsupported_destination",
            ["charge_payment", "reserve_stock"],
        ),
        (
            {
                "customer_id": "bob",
                "items": [{"sku": "LS-606", "quantity": 1}],
                "destination": "DE",
            },
            "out_of_stock",
            [],
        ),
        (
            {
                "customer_id": "nobody",
                "items": [{"sku": "KB-101", "quantity": 1}],
                "destination": "DE",
            },
            "unknown_customer",
            ["reserve_stock"],
        ),
    ],
)
async def test_business_failures_compensate_and_cancel(
    http: httpx.AsyncClient,
    e2e_stack: RunningStack,
    body: dict[str, Any],
    reason: str,
    undone: list[str],
) -> None:
    stock_before = await product(http, e2e_stack, "KB-101")
    bob_before = await balance(http, e2e_stack, "bob")
    order = await placed(http, e2e_stack, body)
    assert order["status"] == "cancelled"
    assert order["failure_reason"].startswith(f"{reason}: ")
    assert [s[0] for s in steps(order) if s[1] == "compensate" and s[2] == "succeeded"] == undone
    # The participants' books show the compensations: stock back, money back.
    after = await product(http, e2e_stack, "KB-101")
    assert (after["available"], after["reserved"]) == (
        stock_before["available"],
        stock_before["reserved"],
    )
    assert await balance(http, e2e_stack, "bob") == bob_before
    if "charge_payment" in undone:
        payment = (await http.get(f"{e2e_stack.url('payment')}/payments/{order['id']}")).json()
        assert payment["status"] == "refunded"
    if "reserve_stock" in undone:
        reservation = (
            await http.get(f"{e2e_stack.url('inventory')}/reservations/{order['id']}")
        ).json()
        assert reservation["status"] == "released"


async def test_an_unknown_sku_is_refused_before_any_saga_once_the_catalogue_is_filled(
    http: httpx.AsyncClient, e2e_stack: RunningStack
) -> None:
    # Order quotes from its catalogue replica: filled (from inventory's snapshot), it knows
    # every SKU, so an unknown one is refused at the door. (Cold, the saga finds out at
    # inventory: tests/integration/test_catalogue.py.)
    order_url = e2e_stack.url("order")
    async with asyncio.timeout(20):
        while not (await http.get(f"{order_url}/catalogue")).json()["staleness"]["filled"]:
            await asyncio.sleep(0.2)
    # POST /orders quotes from the instance's in-memory copy, refreshed every
    # CATALOGUE_REFRESH (0.5 s): it may trail GET /catalogue by that much.
    await asyncio.sleep(1.0)
    before = len((await http.get(f"{order_url}/orders", params={"limit": 100})).json()["orders"])
    body = {"customer_id": "bob", "items": [{"sku": "NOPE-1", "quantity": 1}], "destination": "DE"}
    response = await http.post(f"{order_url}/orders", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == "unknown_sku"
    after = len((await http.get(f"{order_url}/orders", params={"limit": 100})).json()["orders"])
    assert after == before


async def test_same_key_twenty_times_concurrently_is_one_order(
    http: httpx.AsyncClient, e2e_stack: RunningStack
) -> None:
    key = f"e2e-{uuid.uuid4()}"
    body = {
        "customer_id": "carol",
        "items": [{"sku": "MS-202", "quantity": 1}],
        "destination": "FR",
    }
    responses = await asyncio.gather(*(place(http, e2e_stack, body, key) for _ in range(20)))
    assert {r.status_code for r in responses} <= {200, 201, 202}
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    order = await wait_terminal(http, e2e_stack.url("order"), ids.pop())
    assert order["status"] == "completed"
    listed = (
        await http.get(
            f"{e2e_stack.url('order')}/orders", params={"customer_id": "carol", "limit": 100}
        )
    ).json()
    assert sum(1 for o in listed["orders"] if o["id"] == order["id"]) == 1
    other = await place(http, e2e_stack, {**body, "destination": "DE"}, key)
    assert other.status_code == 422
    assert "different order" in other.json()["detail"]


async def test_fifty_orders_for_the_last_ten_units(
    http: httpx.AsyncClient, e2e_stack: RunningStack
) -> None:
    available = (await product(http, e2e_stack, "MN-303"))["available"]
    assert available >= 10
    if available > 10:
        await placed(
            http,
            e2e_stack,
            {
                "customer_id": "alice",
                "items": [{"sku": "MN-303", "quantity": available - 10}],
                "destination": "DE",
            },
        )
    body = {
        "customer_id": "alice",
        "items": [{"sku": "MN-303", "quantity": 1}],
        "destination": "DE",
    }
    responses = await asyncio.gather(*(place(http, e2e_stack, body) for _ in range(50)))
    orders = await asyncio.gather(
        *(wait_terminal(http, e2e_stack.url("order"), r.json()["id"], within=60) for r in responses)
    )
    statuses = [o["status"] for o in orders]
    assert statuses.count("completed") == 10
    assert statuses.count("cancelled") == 40
    assert all(
        o["failure_reason"].startswith("out_of_stock") for o in orders if o["status"] == "cancelled"
    )
    final = await product(http, e2e_stack, "MN-303")
    assert (final["available"], final["reserved"]) == (0, 0)


BAD_BODIES: list[Any] = [
    {},
    {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": 1}]},
    {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": 0}], "destination": "DE"},
    {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": -3}], "destination": "DE"},
    {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": 10**12}], "destination": "DE"},
    {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": "one"}], "destination": "DE"},
    {"customer_id": 42, "items": [{"sku": "KB-101", "quantity": 1}], "destination": "DE"},
    {"customer_id": "alice", "items": [], "destination": "DE"},
    {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": 1}], "destination": "Germany"},
    {
        "customer_id": "alice",
        "items": [{"sku": "KB-101", "quantity": 1}],
        "destination": "DE",
        "coupon": "FREE",
    },
    {
        "customer_id": "alice",
        "items": [{"sku": "KB-101", "quantity": 1}, {"sku": "KB-101", "quantity": 1}],
        "destination": "DE",
    },
    [1, 2, 3],
    {
        "customer_id": "x" * 1_000_000,
        "items": [{"sku": "KB-101", "quantity": 1}],
        "destination": "DE",
    },
]


async def test_bad_input_is_4xx_with_a_message_and_writes_nothing(
    http: httpx.AsyncClient, e2e_stack: RunningStack
) -> None:
    url = f"{e2e_stack.url('order')}/orders"
    before = len((await http.get(url, params={"limit": 100})).json()["orders"])
    for body in BAD_BODIES:
        response = await http.post(url, json=body)
        assert 400 <= response.status_code < 500, (
            body if len(str(body)) < 200 else "1 MB body",
            response.text[:200],
        )
        assert response.json()["detail"]
    not_json = await http.post(
        url, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 422
    assert len((await http.get(url, params={"limit": 100})).json()["orders"]) == before
    assert (await http.get(f"{url}/not-a-uuid")).status_code == 422
    assert (await http.get(url, params={"cursor": "garbage"})).status_code == 422
    assert (await http.get(url, params={"status": "lost"})).status_code == 422


async def test_listing_pages_through_filtered_orders(
    http: httpx.AsyncClient, e2e_stack: RunningStack
) -> None:
    for _ in range(3):
        await placed(
            http,
            e2e_stack,
            {
                "customer_id": "carol",
                "items": [{"sku": "CB-404", "quantity": 1}],
                "destination": "GB",
            },
        )
    url = f"{e2e_stack.url('order')}/orders"
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"customer_id": "carol", "status": "completed", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await http.get(url, params=params)).json()
        seen += [o["id"] for o in page["orders"]]
        assert all(
            o["customer_id"] == "carol" and o["status"] == "completed" for o in page["orders"]
        )
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) >= 3


async def test_retry_endpoint_needs_the_admin_token(
    http: httpx.AsyncClient, e2e_stack: RunningStack
) -> None:
    order = await placed(
        http,
        e2e_stack,
        {"customer_id": "bob", "items": [{"sku": "CB-404", "quantity": 1}], "destination": "JP"},
    )
    url = f"{e2e_stack.url('order')}/orders/{order['id']}/retry"
    assert (await http.post(url)).status_code == 401
    assert (await http.post(url, headers={"X-Admin-Token": "guess"})).status_code == 403
    assert (await http.post(url, headers={"X-Admin-Token": "ordermesh-admin"})).status_code == 403
    admin = {"X-Admin-Token": e2e_stack.admin_token}
    not_parked = await http.post(url, headers=admin)
    assert not_parked.status_code == 409
    unknown = f"{e2e_stack.url('order')}/orders/{uuid.uuid4()}/retry"
    assert (await http.post(unknown, headers=admin)).status_code == 404


async def test_nobody_outside_the_platform_changes_state_through_an_internal_endpoint(
    http: httpx.AsyncClient, e2e_stack: RunningStack
) -> None:
    order = await placed(
        http,
        e2e_stack,
        {"customer_id": "alice", "items": [{"sku": "KB-101", "quantity": 1}], "destination": "DE"},
    )
    assert order["status"] == "completed"  # the saga's own calls carry service tokens
    payment, inventory = e2e_stack.url("payment"), e2e_stack.url("inventory")
    key = {"Idempotency-Key": f"{order['id']}:charge_payment:undo"}
    refund = await http.post(f"{payment}/payments/{order['id']}/refund", headers=key)
    assert refund.status_code == 401
    grab = {"order_id": str(uuid.uuid4()), "items": [{"sku": "KB-101", "quantity": 5}]}
    reserve = await http.post(f"{inventory}/reservations", json=grab, headers=key)
    assert reserve.status_code == 401
    assert (await http.get(f"{payment}/payments/{order['id']}")).json()["status"] == "charged"
    customers = (await http.get(f"{payment}/customers")).json()
    assert customers
    assert all("balance" not in customer for customer in customers)
