"""Events <-> AMQP messages: the CloudEvents binary mode, and what is refused as unreadable."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aio_pika import DeliveryMode
from aio_pika.abc import HeadersType
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from ordermesh_shared.messaging.envelope import (
    BadEnvelope,
    OutgoingEvent,
    decode_event,
    encode_event,
)
from ordermesh_shared.messaging.topology import Topology, consumer_queue_arguments
from ordermesh_shared.outbox.store import add_event

CREATED = datetime(2026, 11, 26, 12, 0, 0, 123000, tzinfo=UTC)


@dataclass
class Received:
    """An incoming message as decode_event sees it."""

    headers: HeadersType = field(default_factory=dict)
    content_type: str | None = "application/json"
    body: bytes = b"{}"


def outgoing(**overrides: Any) -> OutgoingEvent:
    fields: dict[str, Any] = {
        "id": uuid.UUID("7b1f3c2e-0000-4000-8000-000000000001"),
        "sequence": 42,
        "aggregate_type": "order",
        "aggregate_id": "o-1",
        "event_type": "order_created",
        "payload": {"total": "89.00", "items": [1, 2]},
        "created_at": CREATED,
        "headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    }
    return OutgoingEvent(**(fields | overrides))


def received(event: OutgoingEvent) -> Received:
    message = encode_event(event, service="order")
    return Received(dict(message.headers), message.content_type, message.body)


def test_message_properties_carry_the_event_id_and_persist() -> None:
    message = encode_event(outgoing(), service="order")
    assert message.message_id == "7b1f3c2e-0000-4000-8000-000000000001"
    assert message.headers["ce-id"] == message.message_id
    assert message.type == "ordermesh.order.order_created"
    assert message.app_id == "order"
    assert message.delivery_mode == DeliveryMode.PERSISTENT
    assert message.headers["ce-time"] == "2026-11-26T12:00:00.123000Z"
    assert message.headers["ce-sequence"] == "42"


def test_round_trip_keeps_attributes_payload_and_trace_context() -> None:
    event = decode_event(received(outgoing()))
    assert (event.id, event.service, event.event_type) == (
        "7b1f3c2e-0000-4000-8000-000000000001",
        "order",
        "order_created",
    )
    assert (event.aggregate_type, event.aggregate_id, event.sequence) == ("order", "o-1", 42)
    assert event.source == "/ordermesh/order"
    assert event.time == CREATED
    assert event.data == {"total": "89.00", "items": [1, 2]}
    assert event.extensions == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    }
    assert event.routing_key == "order.order_created"


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda m: m.headers.pop("ce-id"), "CloudEvent"),
        (lambda m: m.headers.pop("ce-sequence"), "extension"),
        (lambda m: m.headers.update({"ce-type": "com.example.other"}), "ordermesh.<service>"),
        (lambda m: setattr(m, "body", b"{not json"), "not JSON"),
        (lambda m: setattr(m, "body", b"[1, 2]"), "JSON object"),
    ],
)
def test_unreadable_messages_are_bad_envelopes(spoil: Any, reason: str) -> None:
    message = received(outgoing())
    spoil(message)
    with pytest.raises(BadEnvelope, match=reason):
        decode_event(message)


def test_a_message_without_cloudevents_headers_is_refused() -> None:
    with pytest.raises(BadEnvelope):
        decode_event(Received(headers={}, body=b"hello"))


def test_routing_key_is_service_dot_event() -> None:
    assert Topology.routing_key("inventory", "stock_reserved") == "inventory.stock_reserved"
    for bad in ("stock.reserved", "Stock", "stock#", "", "*"):
        with pytest.raises(ValueError, match="one routing-key word"):
            Topology.routing_key("inventory", bad)


def test_consumer_queues_are_quorum_with_a_delivery_limit_and_safe_dead_lettering() -> None:
    arguments = consumer_queue_arguments(Topology(dead_letter_exchange="dlx"), max_deliveries=4)
    assert arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-dead-letter-exchange": "dlx",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


class RecordingConnection:
    """Enough of a connection for add_event's checks, which run before any I/O."""

    def __init__(self) -> None:
        self.executed: list[str] = []

    def is_in_transaction(self) -> bool:
        return True

    async def execute(self, sql: str, *args: object) -> str:
        self.executed.append(sql)
        return "SELECT 1"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"event_type": "order.created"}, "one routing-key word"),
        ({"headers": {"Trace-Parent": "x"}}, "extension name"),
        ({"headers": {"id": "x"}}, "extension name"),
        ({"headers": {"tracestate": 3}}, "must be a string"),
    ],
)
async def test_add_event_refuses_what_would_break_the_envelope(
    changes: dict[str, Any], message: str
) -> None:
    conn = RecordingConnection()
    arguments: dict[str, Any] = {
        "aggregate_type": "order",
        "aggregate_id": "o-1",
        "event_type": "order_created",
        "payload": {},
    } | changes
    with pytest.raises(ValueError, match=message):
        await add_event(conn, **arguments)  # type: ignore[arg-type]
    assert conn.executed == []


@pytest.mark.parametrize(
    "event",
    [
        outgoing(),
        outgoing(headers={}, created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        outgoing(aggregate_id="a b/ü", payload={}, sequence=9_000_000_000),
        # Not from add_event (it refuses reserved names), but the attributes must still win.
        outgoing(headers={"id": "not-the-event-id", "sequence": "0"}),
    ],
    ids=["trace-context", "whole-second-time", "odd-aggregate-id", "clashing-extension"],
)
def test_encoding_writes_what_the_sdk_binding_writes(event: OutgoingEvent) -> None:
    # encode_event builds the headers itself (for speed): they must stay the SDK's.
    attributes = {
        **event.headers,
        "id": str(event.id),
        "source": "/ordermesh/order",
        "type": f"ordermesh.order.{event.event_type}",
        "subject": f"{event.aggregate_type}/{event.aggregate_id}",
        "time": event.created_at,
        "datacontenttype": "application/json",
        "aggregatetype": event.aggregate_type,
        "aggregateid": event.aggregate_id,
        "sequence": str(event.sequence),
    }
    sdk = ce_rabbitmq.to_binary(CloudEvent(attributes, orjson.dumps(event.payload)), JSONFormat())
    ours = encode_event(event, service="order")
    assert ours.headers == sdk.headers
    assert (ours.content_type, ours.body) == (sdk.content_type, sdk.body)


def test_a_time_without_zone_is_refused_on_encoding() -> None:
    # Its ce-time would carry no offset, and every consumer would dead-letter it.
    with pytest.raises(ValueError, match="no time zone"):
        encode_event(outgoing(created_at=datetime(2026, 11, 26, 12, 0)), service="order")
