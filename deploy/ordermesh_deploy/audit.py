"""The invariant auditor: do the books balance after whatever was done to the platform?

Waits (bounded) until no order is pending and no outbox row waits, then checks the
failure semantics the platform promises, reading each service's own database (the read APIs
show one record at a time; the invariants are about all of them together). Prints a table
invariant -> ok / VIOLATED with counts and examples; exits non-zero on any violation.
A parked order (``compensation_failed``) must hold no stock and no charge, and be parked only
because a participant refused an undo, never for a fault the saga could have kept retrying.
Reads whichever stack runs: the local one's databases, or compose's as the read-only
``ordermesh_audit`` role on PostgreSQL's published port.

    ordermesh-audit                     # the running stack (local if `make dev` runs)
    ordermesh-audit --target compose --timeout 60
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from ordermesh_deploy import stacks

TERMINAL = ("completed", "cancelled", "compensation_failed")
# How the saga engine records an undo's failure (``Type: message``) when the participant
# answered no (a 4xx): retrying with the same key gets the same answer. Any other error is a
# fault that passes with time.
REFUSALS = ("UpstreamRejected", "StepFailed")


@dataclass
class Finding:
    """One invariant's verdict."""

    invariant: str
    violations: int = 0
    examples: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing broke the invariant."""
        return self.violations == 0


Connections = dict[str, asyncpg.Connection]


def _finding(name: str, bad: list[str], checked: int) -> Finding:
    return Finding(name, len(bad), bad[:3], checked)


async def orders_terminal(db: Connections) -> Finding:
    """Every accepted order reached a terminal state."""
    rows = await db["order"].fetch("SELECT id, status FROM orders")
    bad = [f"{r['id']} {r['status']}" for r in rows if r["status"] not in TERMINAL]
    return _finding("every order terminal", bad, len(rows))


async def stock_conserved(db: Connections) -> Finding:
    """available + reserved + committed = stocked, and the buckets match the reservations."""
    rows = await db["inventory"].fetch(
        """SELECT p.sku, p.available, p.reserved, p.committed, p.stocked,
                  COALESCE(SUM(i.quantity) FILTER (WHERE r.status = 'reserved'), 0) AS held,
                  COALESCE(SUM(i.quantity) FILTER (WHERE r.status = 'committed'), 0) AS sold
           FROM products p
           LEFT JOIN reservation_items i ON i.sku = p.sku
           LEFT JOIN reservations r ON r.id = i.reservation_id
           GROUP BY p.sku ORDER BY p.sku"""
    )
    bad = [
        f"{r['sku']}: {r['available']}+{r['reserved']}+{r['committed']} vs {r['stocked']},"
        f" held {r['held']}, sold {r['sold']}"
        for r in rows
        if r["available"] + r["reserved"] + r["committed"] != r["stocked"]
        or r["reserved"] != r["held"]
        or r["committed"] != r["sold"]
        or r["available"] < 0
    ]
    return _finding("stock conserved", bad, len(rows))


async def _by_order(db: Connections, service: str, sql: str) -> dict[str, asyncpg.Record]:
    return {str(r["order_id"]): r for r in await db[service].fetch(sql)}


async def _orders(db: Connections) -> dict[str, asyncpg.Record]:
    rows = await db["order"].fetch("SELECT id, status, total FROM orders")
    return {str(r["id"]): r for r in rows}


async def one_net_charge(db: Connections) -> Finding:
    """A completed order is charged its total once; any other order holds no charge."""
    orders = await _orders(db)
    payments = await _by_order(db, "payment", "SELECT order_id, status, amount FROM payments")
    bad = []
    for order_id, order in orders.items():
        payment = payments.get(order_id)
        charged = (
            payment["amount"] if payment is not None and payment["status"] == "charged" else None
        )
        if order["status"] == "completed" and charged != order["total"]:
            bad.append(f"{order_id} completed, payment {_state(payment)}")
        elif order["status"] == "cancelled" and charged is not None:
            bad.append(f"{order_id} cancelled but still charged")
    bad += [f"payment for unknown order {oid}" for oid in payments.keys() - orders.keys()]
    return _finding("at most one net charge, refunded when cancelled", bad, len(orders))


async def one_shipment(db: Connections) -> Finding:
    """Exactly one live shipment per completed order, none for the others."""
    orders = await _orders(db)
    shipments = await _by_order(db, "shipping", "SELECT order_id, status FROM shipments")
    bad = []
    for order_id, order in orders.items():
        live = shipments.get(order_id) is not None and shipments[order_id]["status"] == "created"
        if (order["status"] == "completed") != live and order["status"] in (
            "completed",
            "cancelled",
        ):
            bad.append(f"{order_id} {order['status']}, shipment {_state(shipments.get(order_id))}")
    return _finding("exactly one shipment per completed order", bad, len(orders))


async def reservations_settled(db: Connections) -> Finding:
    """Completed orders' stock is committed; cancelled orders hold none."""
    orders = await _orders(db)
    reservations = await _by_order(db, "inventory", "SELECT order_id, status FROM reservations")
    bad = []
    for order_id, order in orders.items():
        state = reservations[order_id]["status"] if order_id in reservations else None
        if order["status"] == "completed" and state != "committed":
            bad.append(f"{order_id} completed, reservation {state}")
        elif order["status"] == "cancelled" and state not in (None, "released"):
            bad.append(f"{order_id} cancelled, reservation {state}")
    return _finding("reservations settled with their orders", bad, len(orders))


async def outbox_drained(db: Connections) -> Finding:
    """Every committed event was published; none is quarantined."""
    bad, checked = [], 0
    for service, conn in db.items():
        row = await conn.fetchrow(
            "SELECT count(*) AS total,"
            " count(*) FILTER (WHERE published_at IS NULL AND quarantined_at IS NULL) AS waiting,"
            " count(*) FILTER (WHERE quarantined_at IS NOT NULL) AS quarantined FROM outbox"
        )
        assert row is not None  # an aggregate always returns a row
        checked += row["total"]
        if row["waiting"] or row["quarantined"]:
            bad.append(f"{service}: {row['waiting']} unpublished, {row['quarantined']} quarantined")
    return _finding("outbox drained (published, none quarantined)", bad, checked)


# The order service's timeline consumer: bound to every event ("#"), it records each one it
# applies in its inbox, and writes a timeline row for the events that belong to an order
# (not, say, inventory's product_changed, which the catalogue replica takes).
TIMELINE_CONSUMER = "order.timeline"


async def events_applied_once(db: Connections) -> Finding:
    """Every published event reached the order timeline's consumer exactly once, and the
    timeline holds nothing else."""
    published: set[str] = set()
    for conn in db.values():
        rows = await conn.fetch("SELECT event_id::text FROM outbox WHERE published_at IS NOT NULL")
        published |= {r["event_id"] for r in rows}
    received = await db["order"].fetch(
        "SELECT message_id FROM inbox WHERE consumer = $1", TIMELINE_CONSUMER
    )
    applied = [
        r["event_id"] for r in await db["order"].fetch("SELECT event_id FROM order_timeline")
    ]
    missing = published - {r["message_id"] for r in received}
    bad = [f"published, never applied: {e}" for e in sorted(missing)]
    bad += [f"applied, never published: {e}" for e in sorted(set(applied) - published)]
    bad += [f"applied twice: {e}" for e in sorted({e for e in applied if applied.count(e) > 1})]
    return _finding("every event applied once (order timeline)", bad, len(published))


async def per_aggregate_order(db: Connections) -> Finding:
    """Each aggregate's events were applied in the order its service committed them."""
    rows = await db["order"].fetch(
        "SELECT service, aggregate_type, order_id, sequence FROM order_timeline"
        " ORDER BY applied_order NULLS FIRST, received_at, event_id"
    )
    last: dict[tuple[str, str, str], int] = {}
    bad = []
    for r in rows:
        aggregate = (r["service"], r["aggregate_type"], str(r["order_id"]))
        if r["sequence"] < last.get(aggregate, 0):
            bad.append(f"{'/'.join(aggregate)}: {r['sequence']} after {last[aggregate]}")
        last[aggregate] = max(r["sequence"], last.get(aggregate, 0))
    return _finding("per-aggregate event order kept", bad, len(last))


async def _parked(db: Connections) -> list[str]:
    rows = await db["order"].fetch(
        "SELECT id FROM orders WHERE status = 'compensation_failed' ORDER BY id"
    )
    return [str(r["id"]) for r in rows]


async def parked_hold_no_stock(db: Connections) -> Finding:
    """A parked order holds no stock: its reservation is released, or was never made."""
    parked = await _parked(db)
    reservations = await _by_order(db, "inventory", "SELECT order_id, status FROM reservations")
    bad = [
        f"{order_id} parked, reservation {reservations[order_id]['status']}"
        for order_id in parked
        if order_id in reservations and reservations[order_id]["status"] != "released"
    ]
    return _finding("parked orders hold no stock", bad, len(parked))


async def parked_not_charged(db: Connections) -> Finding:
    """A parked order's customer is not charged: the charge was refunded, or never made."""
    parked = await _parked(db)
    payments = await _by_order(db, "payment", "SELECT order_id, status, amount FROM payments")
    bad = [
        f"{order_id} parked, charged {payments[order_id]['amount']}, never refunded"
        for order_id in parked
        if order_id in payments and payments[order_id]["status"] == "charged"
    ]
    return _finding("parked orders charged nothing", bad, len(parked))


async def parked_for_a_refusal(db: Connections) -> Finding:
    """An order is parked only because a participant refused an undo (a 4xx answer); a fault
    (unavailable, breaker open, deadline, timeout) passes with time, so the saga should have
    kept retrying instead of parking the order."""
    rows = await db["order"].fetch(
        "SELECT o.id, s.step, s.last_error FROM orders o"
        " LEFT JOIN saga_steps s ON s.saga_id = o.id AND s.direction = 'compensate'"
        "   AND s.status = 'failed'"
        " WHERE o.status = 'compensation_failed' ORDER BY o.id, s.position DESC"
    )
    bad = []
    for r in rows:
        if r["step"] is None:
            bad.append(f"{r['id']} parked, yet no compensation failed")
        elif not str(r["last_error"] or "").startswith(REFUSALS):
            bad.append(f"{r['id']} parked on a fault: undo of {r['step']}: {r['last_error']}")
    return _finding("parked only for a refusal, never a fault", bad, len({r["id"] for r in rows}))


def _state(record: asyncpg.Record | None) -> str:
    return "none" if record is None else str(record["status"])


CHECKS: tuple[Callable[[Connections], Awaitable[Finding]], ...] = (
    orders_terminal,
    stock_conserved,
    one_net_charge,
    one_shipment,
    reservations_settled,
    outbox_drained,
    events_applied_once,
    per_aggregate_order,
    parked_hold_no_stock,
    parked_not_charged,
    parked_for_a_refusal,
)


async def quiescent(db: Connections) -> bool:
    """No order pending and no outbox row waiting anywhere."""
    pending = await db["order"].fetchval(
        "SELECT count(*) FROM orders WHERE status NOT IN ('completed', 'cancelled',"
        " 'compensation_failed')"
    )
    waiting = 0
    for conn in db.values():
        waiting += await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND quarantined_at IS NULL"
        )
    published = sum([await c.fetchval("SELECT count(*) FROM outbox") for c in db.values()])
    # Consumers lag the relay by a moment: quiet means the timeline's consumer caught up as
    # well (its inbox: events of no order, like product_changed, get no timeline row).
    applied = await db["order"].fetchval(
        "SELECT count(*) FROM inbox WHERE consumer = $1", TIMELINE_CONSUMER
    )
    return pending == 0 and waiting == 0 and applied >= published


async def wait_quiescent(db: Connections, within: float) -> float:
    """Poll until quiescent or ``within`` seconds passed; returns the seconds waited."""
    started = time.monotonic()
    # Polling on purpose: quiescence is a state of other processes' databases.
    while time.monotonic() - started < within and not await quiescent(db):  # noqa: ASYNC110
        await asyncio.sleep(0.25)
    return time.monotonic() - started


async def audit(database_urls: dict[str, str], *, within: float = 30.0) -> list[Finding]:
    """Wait for quiescence (bounded), then run every check."""
    db = {s: await asyncpg.connect(url, timeout=5) for s, url in database_urls.items()}
    try:
        await wait_quiescent(db, within)
        return [await check(db) for check in CHECKS]
    finally:
        for conn in db.values():
            await conn.close()


def render(findings: list[Finding]) -> str:
    """The verdict table."""
    width = max(len(f.invariant) for f in findings)
    lines = [f"{'invariant'.ljust(width)}  verdict   checked  violations  examples"]
    for f in findings:
        verdict = "ok" if f.ok else "VIOLATED"
        examples = "; ".join(f.examples)
        counts = f"{f.checked:>7}  {f.violations:>10}"
        lines.append(f"{f.invariant.ljust(width)}  {verdict:<8}  {counts}  {examples}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ordermesh-audit``."""
    parser = argparse.ArgumentParser(
        prog="ordermesh-audit",
        description="Check the platform's invariants after the dust settles.",
    )
    stacks.add_target_arguments(parser)
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for quiescence")
    args = parser.parse_args(argv)
    stack = stacks.find_or_exit(args.target, run_dir=args.run_dir)
    databases = stacks.or_exit(lambda: stack.databases)
    print(f"auditing the {stack.kind} stack", file=sys.stderr)
    findings = asyncio.run(audit(databases, within=args.timeout))
    print(render(findings))
    sys.exit(0 if all(f.ok for f in findings) else 1)


if __name__ == "__main__":
    main()
