"""Participants' commands against real Postgres: idempotent, compensable, never negative."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from inventory.commands import ReserveStock
from inventory.models import ReserveRequest
from ordermesh_shared.commands import Recorded
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from shipping.app import SPEC as SHIPPING
from shipping.app import ShippingSettings

from tests.support.apps import context_of, running, wait_ready
from tests.support.postgres import wait_for_lock_waiter

pytestmark = pytest.mark.integration


@pytest.fixture
async def inventory(fresh_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running(INVENTORY, InventorySettings(database_url=fresh_database)) as client:
        await wait_ready(client)
        yield client


@pytest.fixture
async def payment(fresh_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running(PAYMENT, PaymentSettings(database_url=fresh_database)) as client:
        await wait_ready(client)
        yield client


@pytest.fixture
async def shipping(fresh_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running(SHIPPING, ShippingSettings(database_url=fresh_database)) as client:
        await wait_ready(client)
        yield client


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"{uuid.uuid4()}:step"}


async def stock(client: httpx.AsyncClient, sku: str) -> tuple[int, int, int]:
    p = (await client.get(f"/products/{sku}")).json()
    return p["available"], p["reserved"], p["committed"]


async def test_reserve_commit_and_replay(inventory: httpx.AsyncClient) -> None:
    order_id = str(uuid.uuid4())
    body = {
        "order_id": order_id,
        "items": [{"sku": "KB-101", "quantity": 2}, {"sku": "MS-202", "quantity": 1}],
    }
    headers = key()
    first = await inventory.post("/reservations", json=body, headers=headers)
    assert first.status_code == 201
    assert first.json()["total"] == "203.50"
    replay = await inventory.post("/reservations", json=body, headers=headers)
    assert (replay.status_code, replay.json()) == (201, first.json())
    assert replay.headers["Idempotent-Replay"] == "true"
    assert await stock(inventory, "KB-101") == (498, 2, 0)
    committed = await inventory.post(f"/reservations/{order_id}/commit", headers=key())
    assert committed.json()["status"] == "committed"
    assert await stock(inventory, "KB-101") == (498, 0, 2)


async def test_same_key_other_body_is_refused(inventory: httpx.AsyncClient) -> None:
    headers = key()
    body = {"order_id": str(uuid.uuid4()), "items": [{"sku": "KB-101", "quantity": 1}]}
    await inventory.post("/reservations", json=body, headers=headers)
    body["items"] = [{"sku": "KB-101", "quantity": 3}]
    reused = await inventory.post("/reservations", json=body, headers=headers)
    assert reused.status_code == 422
    assert "different request" in reused.json()["detail"]
    assert await stock(inventory, "KB-101") == (499, 1, 0)


async def test_release_before_reserve_refuses_the_late_reserve(
    inventory: httpx.AsyncClient,
) -> None:
    order_id = str(uuid.uuid4())
    released = await inventory.post(f"/reservations/{order_id}/release", headers=key())
    assert released.json()["status"] == "released"
    late = await inventory.post(
        "/reservations",
        json={"order_id": order_id, "items": [{"sku": "KB-101", "quantity": 1}]},
        headers=key(),
    )
    assert late.status_code == 409
    assert late.json()["reason"] == "released"
    assert await stock(inventory, "KB-101") == (500, 0, 0)


@pytest.mark.parametrize("reserve_commits", [True, False])
async def test_a_release_racing_an_uncommitted_reserve_waits_for_it(
    inventory: httpx.AsyncClient, fresh_database: str, reserve_commits: bool
) -> None:
    # The undo of a reserve whose answer was lost can reach inventory while that reserve's
    # transaction is still open: the release waits for it and acts on what it left.
    order_id = uuid.uuid4()
    request = ReserveRequest.model_validate(
        {"order_id": str(order_id), "items": [{"sku": "KB-101", "quantity": 2}]}
    )
    conn = await asyncpg.connect(fresh_database)
    try:
        reserving = conn.transaction()
        await reserving.start()
        # The reserve's one statement, written but not yet committed.
        command = ReserveStock(request)
        decision = command.decide((await command.load(conn, "order/race")).state)
        assert decision.change is not None
        recorded = Recorded("order/race", "fingerprint", decision.answer, decision.event)
        await command.save(conn, decision.change, recorded)
        release = asyncio.create_task(
            inventory.post(f"/reservations/{order_id}/release", headers=key())
        )
        await wait_for_lock_waiter(fresh_database)  # blocked on the reservation row
        assert not release.done()
        await (reserving.commit() if reserve_commits else reserving.rollback())
        released = await release
    finally:
        await conn.close()
    assert released.status_code == 200
    assert released.json()["status"] == "released"
    assert await stock(inventory, "KB-101") == (500, 0, 0)  # nothing held either way


async def test_shortage_reserves_nothing(inventory: httpx.AsyncClient) -> None:
    body = {
        "order_id": str(uuid.uuid4()),
        "items": [{"sku": "KB-101", "quantity": 1}, {"sku": "HP-505", "quantity": 6}],
    }
    short = await inventory.post("/reservations", json=body, headers=key())
    assert short.status_code == 422
    assert short.json()["reason"] == "out_of_stock"
    assert "5 available, 6 requested" in short.json()["detail"]
    assert await stock(inventory, "KB-101") == (500, 0, 0)
    unknown = await inventory.post(
        "/reservations",
        json={"order_id": str(uuid.uuid4()), "items": [{"sku": "ZZ-1", "quantity": 1}]},
        headers=key(),
    )
    assert (unknown.status_code, unknown.json()["reason"]) == (422, "unknown_sku")


async def test_fifty_racing_reservations_for_ten_units(inventory: httpx.AsyncClient) -> None:
    async with context_of(inventory).db.pool.acquire() as conn:
        await conn.execute("UPDATE products SET available = 10, stocked = 10 WHERE sku = 'MN-303'")

    async def reserve() -> int:
        body = {"order_id": str(uuid.uuid4()), "items": [{"sku": "MN-303", "quantity": 1}]}
        return (await inventory.post("/reservations", json=body, headers=key())).status_code

    statuses = await asyncio.gather(*(reserve() for _ in range(50)))
    assert statuses.count(201) == 10
    assert statuses.count(422) == 40
    assert await stock(inventory, "MN-303") == (0, 10, 0)


async def test_bad_commands_are_4xx_and_write_nothing(inventory: httpx.AsyncClient) -> None:
    order_id = str(uuid.uuid4())
    bad_bodies = [
        {"order_id": order_id, "items": [{"sku": "KB-101", "quantity": 0}]},
        {"order_id": order_id, "items": [{"sku": "KB-101", "quantity": -1}]},
        {"order_id": order_id, "items": [{"sku": "KB-101", "quantity": 10**9}]},
        {"order_id": order_id, "items": [{"sku": "KB-101", "quantity": "two"}]},
        {"order_id": order_id, "items": [{"sku": "KB-101", "quantity": 1}], "extra": 1},
        {"order_id": order_id, "items": []},
        {"items": [{"sku": "KB-101", "quantity": 1}]},
    ]
    for body in bad_bodies:
        response = await inventory.post("/reservations", json=body, headers=key())
        assert response.status_code == 422, body
    no_key = await inventory.post(
        "/reservations", json={"order_id": order_id, "items": [{"sku": "KB-101", "quantity": 1}]}
    )
    assert no_key.status_code == 422
    assert "Idempotency-Key" in no_key.text
    assert (await inventory.get(f"/reservations/{order_id}")).status_code == 404
    assert await stock(inventory, "KB-101") == (500, 0, 0)


async def test_charge_decline_refund_and_late_charge(payment: httpx.AsyncClient) -> None:
    order_id = str(uuid.uuid4())
    headers = key()
    charge = {"order_id": order_id, "customer_id": "carol", "amount": "120.00"}
    first = await payment.post("/payments", json=charge, headers=headers)
    assert (first.status_code, first.json()["status"]) == (201, "charged")
    assert (await payment.post("/payments", json=charge, headers=headers)).json() == first.json()
    assert (await payment.get("/customers/carol")).json()["balance"] == "380.00"
    refund = await payment.post(f"/payments/{order_id}/refund", headers=key())
    assert refund.json()["status"] == "refunded"
    assert (await payment.get("/customers/carol")).json()["balance"] == "500.00"
    again = await payment.post("/payments", json=charge, headers=key())
    assert (again.status_code, again.json()["reason"]) == (409, "refunded")
    assert (await payment.get("/customers/carol")).json()["balance"] == "500.00"

    declined = await payment.post(
        "/payments",
        json={"order_id": str(uuid.uuid4()), "customer_id": "dave", "amount": "25.00"},
        headers=key(),
    )
    assert (declined.status_code, declined.json()["reason"]) == (422, "insufficient_funds")
    assert declined.json()["payment"]["status"] == "declined"
    assert (await payment.get("/customers/dave")).json()["balance"] == "20.00"
    unknown = await payment.post(
        "/payments",
        json={"order_id": str(uuid.uuid4()), "customer_id": "zoe", "amount": "1.00"},
        headers=key(),
    )
    assert (unknown.status_code, unknown.json()["reason"]) == (422, "unknown_customer")


async def test_refund_before_charge_voids_the_late_charge(payment: httpx.AsyncClient) -> None:
    order_id = str(uuid.uuid4())
    voided = await payment.post(f"/payments/{order_id}/refund", headers=key())
    assert voided.json()["status"] == "voided"
    late = await payment.post(
        "/payments",
        json={"order_id": order_id, "customer_id": "bob", "amount": "10.00"},
        headers=key(),
    )
    assert late.status_code == 409
    assert (await payment.get("/customers/bob")).json()["balance"] == "50000.00"


async def test_shipment_rules(shipping: httpx.AsyncClient) -> None:
    order_id = str(uuid.uuid4())
    created = await shipping.post(
        "/shipments", json={"order_id": order_id, "destination": "DE"}, headers=key()
    )
    assert created.status_code == 201
    found = await shipping.get("/shipments", params={"order_id": order_id})
    assert found.json()["id"] == created.json()["id"]
    cancelled = await shipping.post(f"/shipments/by-order/{order_id}/cancel", headers=key())
    assert cancelled.json()["status"] == "cancelled"

    antarctica = await shipping.post(
        "/shipments", json={"order_id": str(uuid.uuid4()), "destination": "AQ"}, headers=key()
    )
    assert (antarctica.status_code, antarctica.json()["reason"]) == (422, "unsupported_destination")

    early_cancel = str(uuid.uuid4())
    await shipping.post(f"/shipments/by-order/{early_cancel}/cancel", headers=key())
    late = await shipping.post(
        "/shipments", json={"order_id": early_cancel, "destination": "FR"}, headers=key()
    )
    assert (late.status_code, late.json()["reason"]) == (409, "cancelled")


async def outbox_events(client: httpx.AsyncClient, order_id: str) -> list[str]:
    async with context_of(client).db.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event_type FROM outbox WHERE aggregate_id = $1 ORDER BY id", order_id
        )
    return [r["event_type"] for r in rows]


async def test_state_changes_emit_events_and_rejections_emit_none(
    inventory: httpx.AsyncClient,
) -> None:
    order_id = str(uuid.uuid4())
    body = {"order_id": order_id, "items": [{"sku": "KB-101", "quantity": 1}]}
    await inventory.post("/reservations", json=body, headers=key())
    await inventory.post(f"/reservations/{order_id}/release", headers=key())
    await inventory.post(f"/reservations/{order_id}/release", headers=key())  # no change, no event
    assert await outbox_events(inventory, order_id) == ["stock_reserved", "stock_released"]
    short = str(uuid.uuid4())
    await inventory.post(
        "/reservations",
        json={"order_id": short, "items": [{"sku": "HP-505", "quantity": 99}]},
        headers=key(),
    )
    assert await outbox_events(inventory, short) == []


async def test_racing_retries_of_one_command_take_effect_once(payment: httpx.AsyncClient) -> None:
    # A saga step retried while the first attempt still runs: same key, same body, at once.
    headers = key()
    charge = {"order_id": str(uuid.uuid4()), "customer_id": "carol", "amount": "100.00"}
    answers = await asyncio.gather(
        *(payment.post("/payments", json=charge, headers=headers) for _ in range(12))
    )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert [a.headers["Idempotent-Replay"] for a in answers].count("false") == 1
    assert (await payment.get("/customers/carol")).json()["balance"] == "400.00"


async def test_racing_retries_of_a_refused_command_get_one_answer(
    inventory: httpx.AsyncClient,
) -> None:
    headers = key()
    body = {"order_id": str(uuid.uuid4()), "items": [{"sku": "MN-303", "quantity": 31}]}
    answers = await asyncio.gather(
        *(inventory.post("/reservations", json=body, headers=headers) for _ in range(12))
    )
    assert {(a.status_code, a.json()["reason"]) for a in answers} == {(422, "out_of_stock")}
    assert [a.headers["Idempotent-Replay"] for a in answers].count("false") == 1
    assert await stock(inventory, "MN-303") == (30, 0, 0)
    replay = await inventory.post("/reservations", json=body, headers=headers)
    assert (replay.status_code, replay.headers["Idempotent-Replay"]) == (422, "true")


async def test_racing_retries_of_a_reserve_take_stock_once(inventory: httpx.AsyncClient) -> None:
    # No lock between a command's load and its save: the losers of the race rerun, and
    # replay the winner's answer.
    headers = key()
    body = {"order_id": str(uuid.uuid4()), "items": [{"sku": "MN-303", "quantity": 2}]}
    answers = await asyncio.gather(
        *(inventory.post("/reservations", json=body, headers=headers) for _ in range(12))
    )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert [a.headers["Idempotent-Replay"] for a in answers].count("false") == 1
    assert await stock(inventory, "MN-303") == (28, 2, 0)


async def test_racing_release_and_commit_settle_once(inventory: httpx.AsyncClient) -> None:
    order_id = str(uuid.uuid4())
    body = {"order_id": order_id, "items": [{"sku": "MN-303", "quantity": 3}]}
    assert (await inventory.post("/reservations", json=body, headers=key())).status_code == 201
    paths = [f"/reservations/{order_id}/{verb}" for verb in ("release", "commit") * 6]
    answers = await asyncio.gather(*(inventory.post(path, headers=key()) for path in paths))
    final = (await inventory.get(f"/reservations/{order_id}")).json()["status"]
    # One of the two won; every call of the other kind was refused by its state.
    loser = {"released": "commit", "committed": "release"}[final]
    assert {a.status_code for a, p in zip(answers, paths, strict=True) if p.endswith(loser)} == {
        409
    }
    bucket = {"released": (30, 0, 0), "committed": (27, 0, 3)}[final]
    assert await stock(inventory, "MN-303") == bucket


async def test_racing_retries_of_a_create_ship_once(shipping: httpx.AsyncClient) -> None:
    headers = key()
    order_id = str(uuid.uuid4())
    body = {"order_id": order_id, "destination": "DE"}
    answers = await asyncio.gather(
        *(shipping.post("/shipments", json=body, headers=headers) for _ in range(12))
    )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert [a.headers["Idempotent-Replay"] for a in answers].count("false") == 1
    assert await outbox_events(shipping, order_id) == ["shipment_created"]


@pytest.mark.parametrize("first", ["create", "cancel"])
async def test_racing_creates_and_cancels_settle_consistently(
    shipping: httpx.AsyncClient, first: str
) -> None:
    # The saga's late create and its undo, each retried under keys of their own, at once.
    order_id = str(uuid.uuid4())
    create = {"order_id": order_id, "destination": "DE"}
    verbs = (first, {"create": "cancel", "cancel": "create"}[first]) * 6
    answers = await asyncio.gather(
        *(
            shipping.post("/shipments", json=create, headers=key())
            if verb == "create"
            else shipping.post(f"/shipments/by-order/{order_id}/cancel", headers=key())
            for verb in verbs
        )
    )
    final = (await shipping.get("/shipments", params={"order_id": order_id})).json()
    assert final["status"] == "cancelled"  # whoever came first, the undo stands
    creates = [a for a, verb in zip(answers, verbs, strict=True) if verb == "create"]
    cancels = [a for a, verb in zip(answers, verbs, strict=True) if verb == "cancel"]
    assert {(a.status_code, a.json()["status"]) for a in cancels} == {(200, "cancelled")}
    # Every answer that shows a shipment shows the one there is.
    shown = [a.json()["id"] for a in [*creates, *cancels] if a.status_code < 300]
    assert set(shown) == {final["id"]}
    if any(a.status_code == 201 for a in creates):  # created once, then cancelled once
        assert [a.status_code for a in creates].count(201) == 1
        assert {a.status_code for a in creates} <= {201, 200, 409}
        assert final["destination"] == "DE"
        events = ["shipment_created", "shipment_cancelled"]
    else:  # the cancel came first: its marker refused every create
        assert {a.json()["reason"] for a in creates} == {"cancelled"}
        assert final["destination"] is None
        events = []
    assert await outbox_events(shipping, order_id) == events


@pytest.mark.parametrize("created", [True, False])
async def test_racing_cancels_cancel_once(shipping: httpx.AsyncClient, created: bool) -> None:
    order_id = str(uuid.uuid4())
    if created:
        body = {"order_id": order_id, "destination": "FR"}
        assert (await shipping.post("/shipments", json=body, headers=key())).status_code == 201
    path = f"/shipments/by-order/{order_id}/cancel"
    answers = await asyncio.gather(*(shipping.post(path, headers=key()) for _ in range(12)))
    assert {(a.status_code, a.json()["status"]) for a in answers} == {(200, "cancelled")}
    assert len({a.json()["id"] for a in answers}) == 1  # one shipment, or one marker
    expected = ["shipment_created", "shipment_cancelled"] if created else []
    assert await outbox_events(shipping, order_id) == expected


async def balance(client: httpx.AsyncClient, customer_id: str) -> str:
    return str((await client.get(f"/customers/{customer_id}")).json()["balance"])


async def test_racing_charges_of_one_order_under_other_keys_charge_once(
    payment: httpx.AsyncClient,
) -> None:
    order_id = str(uuid.uuid4())
    charge = {"order_id": order_id, "customer_id": "carol", "amount": "100.00"}
    answers = await asyncio.gather(
        *(payment.post("/payments", json=charge, headers=key()) for _ in range(12))
    )
    assert sorted(a.status_code for a in answers) == [200] * 11 + [201]
    assert len({a.json()["id"] for a in answers}) == 1
    assert await balance(payment, "carol") == "400.00"
    assert await outbox_events(payment, order_id) == ["charged"]


async def test_racing_charges_that_overdraw_decline_the_rest(payment: httpx.AsyncClient) -> None:
    # Each charge loads a balance that covers it; those whose debit then finds it drained
    # lost a race: they rerun, and are declined.
    orders = [str(uuid.uuid4()) for _ in range(6)]
    answers = await asyncio.gather(
        *(
            payment.post(
                "/payments",
                json={"order_id": order_id, "customer_id": "carol", "amount": "200.00"},
                headers=key(),
            )
            for order_id in orders
        )
    )
    assert sorted(a.status_code for a in answers) == [201, 201, 422, 422, 422, 422]
    declined = [a.json() for a in answers if a.status_code == 422]
    assert {(d["reason"], d["payment"]["status"]) for d in declined} == {
        ("insufficient_funds", "declined")
    }
    assert await balance(payment, "carol") == "100.00"
    events = [await outbox_events(payment, order_id) for order_id in orders]
    assert sorted(events) == [["charged"]] * 2 + [["declined"]] * 4


async def test_racing_charge_and_refund_of_one_order_conserve_the_balance(
    payment: httpx.AsyncClient,
) -> None:
    order_id = str(uuid.uuid4())
    charge = {"order_id": order_id, "customer_id": "carol", "amount": "120.00"}
    calls = [
        payment.post("/payments", json=charge, headers=key())
        if i % 2 == 0
        else payment.post(f"/payments/{order_id}/refund", headers=key())
        for i in range(12)
    ]
    answers = await asyncio.gather(*calls)
    charges, refunds = answers[0::2], answers[1::2]
    # Charged then refunded, or voided by a refund that came first: never kept.
    final = (await payment.get(f"/payments/{order_id}")).json()["status"]
    assert final in ("refunded", "voided")
    assert {(r.status_code, r.json()["status"]) for r in refunds} == {(200, final)}
    statuses = [c.status_code for c in charges]
    assert statuses.count(201) == (1 if final == "refunded" else 0)
    assert set(statuses) <= {201, 200, 409}
    assert {c.json()["reason"] for c in charges if c.status_code == 409} <= {final}
    assert await balance(payment, "carol") == "500.00"
    events = {"refunded": ["charged", "refunded"], "voided": []}[final]
    assert await outbox_events(payment, order_id) == events


@pytest.mark.parametrize(
    ("amount", "balance_meanwhile", "decided", "rerun"),
    [("100.00", "50.00", "charged", "declined"), ("600.00", "1000.00", "declined", "charged")],
)
async def test_a_charge_whose_balance_changed_after_its_load_writes_nothing(
    payment: httpx.AsyncClient, amount: str, balance_meanwhile: str, decided: str, rerun: str
) -> None:
    from payment.commands import ChargeCustomer
    from payment.models import ChargeRequest

    order_id = str(uuid.uuid4())
    request = {"order_id": order_id, "customer_id": "carol", "amount": amount}
    command = ChargeCustomer(ChargeRequest.model_validate(request))
    async with context_of(payment).db.pool.acquire() as conn:
        decision = command.decide((await command.load(conn, "order/race")).state)
        assert decision.change is not None
        assert decision.change.status == decided
        await conn.execute(
            "UPDATE customers SET balance = $1::text::numeric WHERE id = 'carol'",
            balance_meanwhile,
        )
        recorded = Recorded("order/race", "fingerprint", decision.answer, decision.event)
        with pytest.raises(asyncpg.SerializationError):  # a lost race: command_raced()
            await command.save(conn, decision.change, recorded)
        loaded = await command.load(conn, "order/race")
    # Nothing was written: no answer, no payment, no event, no money moved...
    assert loaded.stored is None
    existing, account = loaded.state
    assert existing is None
    assert account is not None
    assert str(account.balance) == balance_meanwhile
    assert await outbox_events(payment, order_id) == []
    # ...and the rerun decides on the balance as it is now.
    again = command.decide(loaded.state)
    assert again.change is not None
    assert again.change.status == rerun
