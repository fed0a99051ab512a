"""Events on the wire: CloudEvents 1.0 in binary content mode over AMQP 0-9-1.

The cloudevents package's RabbitMQ binding (``cloudevents.core.bindings.rabbitmq``, the AMQP
0-9-1 mapping; its ``amqp`` module is for AMQP 1.0) puts the attributes in ``ce-*`` headers and
the JSON payload in the body. Decoding goes through it; encoding writes the same headers
directly, for speed (see :func:`encode_event`). On top of it we set the AMQP properties
RabbitMQ tools show: ``message_id`` (= the CloudEvents id = the outbox event id), ``type``,
``app_id``, ``timestamp``, and persistent delivery.

Attributes we use: ``source`` = ``/ordermesh/<service>``, ``type`` =
``ordermesh.<service>.<event_type>``, ``subject`` = ``<aggregate_type>/<aggregate_id>``, and
the extensions ``aggregatetype``, ``aggregateid`` and ``sequence`` (the outbox row id: per
producer and aggregate it grows in commit order), plus any from the outbox row's headers:
``traceparent`` among them, the CloudEvents distributed-tracing extension (the W3C trace
context of the transaction that wrote the event; :attr:`Event.traceparent` on receipt).

>>> message = encode_event(outgoing, service="order")     # an aio_pika.Message
>>> event = decode_event(incoming)                        # an Event, or BadEnvelope
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
from aio_pika import DeliveryMode, Message
from aio_pika.abc import HeadersType
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

_FORMAT = JSONFormat()
SPEC_VERSION = "1.0"
_CONTENT_TYPE = "application/json"
_OWN_EXTENSIONS = ("aggregatetype", "aggregateid", "sequence")
_REQUIRED_HEADERS = ("ce-id", "ce-source", "ce-type", "ce-specversion")


class ReceivedMessage(Protocol):
    """What decoding reads of an incoming AMQP message (aio-pika's satisfies it)."""

    @property
    def headers(self) -> HeadersType: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def body(self) -> bytes: ...


class BadEnvelope(Exception):
    """A message that is not one of our CloudEvents; retrying cannot fix it."""


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    """What the relay publishes: one outbox row.

    >>> event = OutgoingEvent(event_id, 17, "order", "o-1", "order_created", {}, created_at)
    >>> encode_event(event, service="order")
    """

    id: uuid.UUID
    sequence: int
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: Mapping[str, Any]
    created_at: datetime
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    """A received event, as handlers see it.

    >>> async def handler(conn: DbConn, event: Event) -> None:
    ...     print(event.routing_key, event.aggregate_id, event.sequence, event.data)
    """

    id: str
    source: str
    type: str
    service: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    sequence: int
    time: datetime | None
    data: dict[str, Any]
    extensions: dict[str, str] = field(default_factory=dict)

    @property
    def routing_key(self) -> str:
        return f"{self.service}.{self.event_type}"

    @property
    def traceparent(self) -> str | None:
        """The W3C trace context the event was written in (the CloudEvents distributed-tracing
        extension), for the consumer to continue; None when it was written outside a trace."""
        return self.extensions.get("traceparent")


def ce_type(service: str, event_type: str) -> str:
    """The CloudEvents ``type`` of an event: reverse-DNS style, e.g. ``ordermesh.order.created``."""
    return f"ordermesh.{service}.{event_type}"


def encode_event(event: OutgoingEvent, *, service: str) -> Message:
    """The AMQP message for ``event``; its ``message_id`` is the event id.

    The ``ce-*`` headers are written here rather than through the SDK's ``CloudEvent`` and
    ``to_binary``: the relay encodes every event it publishes, and the SDK's validating
    object took 10 us of the relay's ~180 us of CPU per event (bench/README.md). The headers
    are the binding's, byte for byte (tests/unit/test_outbox_envelope.py compares them with
    ``to_binary``'s), and decoding still goes through the SDK.
    """
    if event.created_at.tzinfo is None:
        # ce-time would go out without an offset, which decoding refuses (as the SDK did here).
        raise ValueError(f"event {event.id}: created_at has no time zone")
    event_id = str(event.id)
    type_ = ce_type(service, event.event_type)
    # The outbox row's extensions first, as the SDK binding writes them (a value of None is
    # left out, others become text), so that ours win over any clash.
    headers = {f"ce-{k}": str(v) for k, v in event.headers.items() if v is not None}
    headers.update(
        {
            "ce-id": event_id,
            "ce-source": f"/ordermesh/{service}",
            "ce-type": type_,
            "ce-subject": f"{event.aggregate_type}/{event.aggregate_id}",
            "ce-time": _rfc3339(event.created_at),
            "ce-aggregatetype": event.aggregate_type,
            "ce-aggregateid": event.aggregate_id,
            "ce-sequence": str(event.sequence),
            "ce-specversion": SPEC_VERSION,
        }
    )
    return Message(
        orjson.dumps(event.payload),
        headers=headers,  # type: ignore[arg-type]  # str values are valid AMQP table values
        content_type=_CONTENT_TYPE,
        message_id=event_id,
        type=type_,
        app_id=service,
        timestamp=event.created_at,
        delivery_mode=DeliveryMode.PERSISTENT,
    )


def _rfc3339(moment: datetime) -> str:
    # As the binding writes it: ISO 8601, UTC as "Z".
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def decode_event(message: ReceivedMessage) -> Event:
    """The event in ``message``; raises :class:`BadEnvelope` when it is not one of ours."""
    headers = {
        k.lower(): _header_text(k, v)
        for k, v in (message.headers or {}).items()
        if k.lower().startswith(ce_rabbitmq.CE_PREFIX)
    }
    # The SDK would invent a random id (and time) for a message without one, and an invented
    # id defeats the inbox: refuse such messages instead.
    missing = [name for name in _REQUIRED_HEADERS if name not in headers]
    if missing:
        raise BadEnvelope(f"not a CloudEvent: no {', '.join(missing)} header")
    # The body is parsed once, below, with orjson; the binding only reads the attributes.
    wire = ce_rabbitmq.RabbitMQMessage(headers=headers, content_type=message.content_type, body=b"")
    try:
        cloud_event = ce_rabbitmq.from_binary(wire, _FORMAT, CloudEvent)
    except (BaseCloudEventException, ValueError, TypeError) as exc:
        raise BadEnvelope(f"not a CloudEvent: {exc}") from exc
    return _to_event(cloud_event.get_attributes(), _payload(message.body))


def _to_event(attributes: Mapping[str, Any], data: dict[str, Any]) -> Event:
    service, event_type = _split_type(str(attributes["type"]))
    try:
        sequence = int(attributes["sequence"])
        aggregate_type = str(attributes["aggregatetype"])
        aggregate_id = str(attributes["aggregateid"])
    except (KeyError, ValueError) as exc:
        raise BadEnvelope(f"missing or bad extension attribute: {exc}") from exc
    time = attributes.get("time")
    return Event(
        id=str(attributes["id"]),
        source=str(attributes["source"]),
        type=str(attributes["type"]),
        service=service,
        event_type=event_type,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        sequence=sequence,
        time=time if isinstance(time, datetime) else None,
        data=data,
        extensions=_extensions(attributes),
    )


def _split_type(type_: str) -> tuple[str, str]:
    prefix, _, rest = type_.partition(".")
    service, _, event_type = rest.partition(".")
    if prefix != "ordermesh" or not service or not event_type:
        raise BadEnvelope(f"type {type_!r} is not ordermesh.<service>.<event_type>")
    return service, event_type


def _payload(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadEnvelope(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadEnvelope("body is not a JSON object")
    return data


def _extensions(attributes: Mapping[str, Any]) -> dict[str, str]:
    standard = {"id", "source", "type", "specversion", "subject", "time", "datacontenttype"}
    skip = standard.union(_OWN_EXTENSIONS, {"dataschema"})
    return {k: str(v) for k, v in attributes.items() if k not in skip}


def _header_text(name: str, value: object) -> str:
    # The binding reads strings; AMQP tables may hand us bytes (pamqp passes on a long string
    # that is not UTF-8 as bytes): such a message is not one of ours.
    if not isinstance(value, bytes | bytearray):
        return str(value)
    try:
        return bytes(value).decode()
    except UnicodeDecodeError as exc:
        raise BadEnvelope(f"header {name} is not UTF-8 text: {exc}") from exc
