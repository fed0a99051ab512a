"""``make events``: tail the live event stream, one readable line per event.

    $ python -m ordermesh_deploy.events                    # everything, on the running stack
    $ python -m ordermesh_deploy.events 'payment.*' '*.shipment_created' --payload 0
    14:56:27.123  order.created               order/1b7f...c9  #17  {"customer_id":"alice",...}
    14:56:27.140  inventory.stock_reserved    reservation/1b7f...c9  #8  {"status":"held",...}

It reads through a queue of its own (exclusive, deleted when it exits) bound to the events
exchange, so it takes nothing away from the services' consumers. While it runs, every event is
routable (this queue receives it): an event no service listens to is then confirmed rather than
returned to the relay, so do not leave it running in place of a real consumer. It finds the
broker of whichever stack runs (compose: as the ``admin`` user, on the published AMQP port)
unless ``--url`` (or ``$RABBITMQ_URL``, without ``--target``) says where.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TextIO

import aio_pika
import aio_pika.exceptions
import orjson
from aio_pika.abc import AbstractIncomingMessage
from ordermesh_shared.messaging.envelope import BadEnvelope, Event, decode_event
from ordermesh_shared.messaging.topology import EVENTS_EXCHANGE, Topology, declare_events_exchange

from ordermesh_deploy import local, stacks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ordermesh-events",
        description="Tail the Ordermesh event stream: one line per event (time, routing key,"
        " aggregate, sequence, payload).",
        epilog="Routing keys are <service>.<event_type>, e.g. inventory.stock_reserved;"
        " patterns use * for one word and # for any number of words.",
    )
    parser.add_argument(
        "patterns", nargs="*", default=["#"], help="routing-key patterns to show (default: #)"
    )
    parser.add_argument(
        "--url",
        default=None,
        help="AMQP URL (default: the running stack's broker; $RABBITMQ_URL when set and no"
        " --target is given)",
    )
    stacks.add_target_arguments(parser)
    parser.add_argument(
        "--exchange", default=EVENTS_EXCHANGE, help="events exchange (default: %(default)s)"
    )
    parser.add_argument(
        "--payload",
        type=int,
        default=100,
        metavar="CHARS",
        help="show at most CHARS of each payload; 0 hides it (default: %(default)s)",
    )
    parser.add_argument(
        "--count", type=int, default=0, help="exit after this many events (default: run until ^C)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead")
    return parser.parse_args(argv)


def format_event(event: Event, *, payload_chars: int) -> str:
    """``HH:MM:SS.mmm  service.event  aggregate/id  #sequence  payload``."""
    when = _clock(event.time)
    line = f"{when}  {event.routing_key:<28}  {event.aggregate_type}/{event.aggregate_id}"
    line += f"  #{event.sequence}"
    if payload_chars > 0:
        line += f"  {_shorten(orjson.dumps(event.data).decode(), payload_chars)}"
    return line


def format_json(event: Event) -> str:
    """The event as one JSON object (for piping into jq)."""
    return orjson.dumps(
        {
            "id": event.id,
            "type": event.type,
            "routing_key": event.routing_key,
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "sequence": event.sequence,
            "time": event.time,
            "data": event.data,
        }
    ).decode()


def format_unreadable(message: AbstractIncomingMessage, error: BadEnvelope) -> str:
    body = message.body.decode("utf-8", "replace")
    return (
        f"{_clock(None)}  {message.routing_key or '?':<28}  (not an event: {error}) {body[:60]!r}"
    )


def _clock(when: datetime | None) -> str:
    stamp = (when or datetime.now().astimezone()).astimezone()
    return stamp.strftime("%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


class Tail:
    """Prints events from an exclusive queue until stopped or ``count`` were shown.

    >>> await Tail(args, out=sys.stdout).run()
    """

    def __init__(self, args: argparse.Namespace, *, out: TextIO) -> None:
        self._args = args
        self._out = out
        self._shown = 0
        self.done = asyncio.Event()

    async def run(self) -> None:
        connection = await aio_pika.connect_robust(self._args.url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=200)
            exchange = await declare_events_exchange(
                channel, Topology(events_exchange=self._args.exchange)
            )
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for pattern in self._args.patterns:
                await queue.bind(exchange, pattern)
            # no_ack: a read-only view of the stream; this queue's copies matter to nobody.
            await queue.consume(self._show, no_ack=True)
            # Said once the queue is bound: every event published after this line is shown.
            print(
                f"tailing {self._args.exchange} {' '.join(self._args.patterns)}"
                f" at {local.redact(self._args.url)} (^C stops)",
                file=sys.stderr,
                flush=True,
            )
            await self.done.wait()

    async def _show(self, message: AbstractIncomingMessage) -> None:
        try:
            event = decode_event(message)
        except BadEnvelope as exc:
            print(format_unreadable(message, exc), file=self._out, flush=True)
        else:
            line = (
                format_json(event)
                if self._args.json
                else format_event(event, payload_chars=self._args.payload)
            )
            print(line, file=self._out, flush=True)
        self._shown += 1
        if self._args.count and self._shown >= self._args.count:
            self.done.set()


async def _main(args: argparse.Namespace) -> None:
    tail = Tail(args, out=sys.stdout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, tail.done.set)
    await tail.run()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -m ordermesh_deploy.events``."""
    args = parse_args(argv)
    if args.url is None and args.target is None:
        args.url = os.environ.get("RABBITMQ_URL") or None
    if args.url is None:
        stack = stacks.find_or_exit(args.target, run_dir=args.run_dir)
        args.url = stacks.or_exit(lambda: stack.amqp_url)
    try:
        asyncio.run(_main(args))
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        where = local.redact(args.url)
        print(f"ordermesh-events: cannot reach RabbitMQ at {where}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
