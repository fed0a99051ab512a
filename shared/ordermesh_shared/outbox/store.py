"""The outbox table's SQL: writing events in the business transaction, and the relay's queries.

>>> async with pool.acquire() as conn, conn.transaction():
...     await conn.execute("UPDATE stock SET reserved = reserved + $1 ...", 2)
...     await add_event(conn, aggregate_type="stock", aggregate_id="KB-101",
...                     event_type="stock_reserved", payload={"sku": "KB-101", "quantity": 2})
... # committed together, or neither; the NOTIFY wakes the relay only on commit
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from ordermesh_shared.database import DbConn
from ordermesh_shared.messaging.envelope import OutgoingEvent
from ordermesh_shared.messaging.topology import check_word
from ordermesh_shared.tracing import TRACEPARENT, current_traceparent

NOTIFY_CHANNEL = "ordermesh_outbox"

# CloudEvents extension names: lowercase letters and digits (the spec advises <= 20 chars).
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_RESERVED_HEADERS = frozenset(
    {"id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema"}
    | {"aggregatetype", "aggregateid", "sequence", "data"}
)


class NotInTransaction(Exception):
    """``add_event`` was called outside a transaction: the event would commit on its own."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A row whose publish failed, and why."""

    row_id: int
    error: str


@dataclass(frozen=True, slots=True)
class Backoff:
    """When a failed row is tried again: ``base * 2**(attempts-1)``, capped, with jitter;
    after ``max_attempts`` failures the row is quarantined instead.

    >>> Backoff(base=0.5, cap=60.0, max_attempts=10)   # ~3 minutes before quarantine
    """

    base: float = 0.5
    cap: float = 60.0
    # ~3 minutes of retries: long enough to ride out a consumer queue not declared yet
    # (unroutable until then), short enough that a real poison row shows up soon.
    max_attempts: int = 10


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """What recording failures did: rows quarantined now, and the soonest retry."""

    quarantined: list[int]
    next_retry_in: float | None


@dataclass(frozen=True, slots=True)
class OutboxLag:
    """How far the relay is behind: unpublished events, the oldest one's age, quarantined."""

    pending: int
    oldest_age_seconds: float
    quarantined: int

    def as_json(self) -> dict[str, float | int]:
        return {
            "pending": self.pending,
            "oldest_pending_age_seconds": round(self.oldest_age_seconds, 3),
            "quarantined": self.quarantined,
        }


@dataclass(frozen=True, slots=True)
class QuarantinedRow:
    """A row the relay gave up on, as the admin endpoint lists it."""

    id: int
    event_id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    attempts: int
    last_error: str | None
    created_at: datetime
    quarantined_at: datetime
    held_behind: int  # later events of the same aggregate waiting for this one


async def add_event(
    conn: DbConn,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    notify: bool = True,
) -> uuid.UUID:
    """Record an event in the caller's transaction; returns its id (the CloudEvents id).

    Call it after the write that locks the aggregate: per aggregate, outbox ids then follow
    commit order, which is the order consumers receive the events in.

    ``notify=False`` leaves the relay to find the row at its next poll. The NOTIFY costs:
    Postgres commits notifying transactions one at a time, cluster-wide (measured here: 16
    writers commit ~2x slower), so a bulk writer may prefer to skip it.

    Inside a trace, the current ``traceparent`` goes into ``headers`` (unless given there):
    the relay sends it as the CloudEvents tracing extension and consumers continue the trace.
    """
    if not conn.is_in_transaction():
        raise NotInTransaction("add_event must run inside the business transaction")
    check_word(event_type, what="event type")
    _check_headers(headers or {})
    headers = traced(headers)
    event_id = uuid.uuid4()
    # One round trip; pg_notify inside the transaction is delivered only if it commits.
    await conn.execute(
        _ADD_AND_NOTIFY if notify else _ADD,
        event_id,
        aggregate_type,
        aggregate_id,
        event_type,
        orjson.dumps(payload).decode(),
        orjson.dumps(headers).decode(),
    )
    return event_id


def traced_json() -> str:
    """The ``headers`` JSON of an event written by a statement of its own: the current
    span's ``traceparent`` when in a trace, else ``{}``."""
    return orjson.dumps(traced(None)).decode()


def traced(headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` with the current span's ``traceparent`` (when in a trace and not given)."""
    stored = dict(headers or {})
    if TRACEPARENT not in stored and (traceparent := current_traceparent()) is not None:
        stored[TRACEPARENT] = traceparent
    return stored


_ADD = (
    "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, headers)"
    " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)"
)
# The payload is the row id, so a relay can tell a wake-up for a row it has just claimed
# (nothing to do) from one for a row committed after its claim (claim again).
_ADD_AND_NOTIFY = (
    f"WITH added AS ({_ADD} RETURNING id) SELECT pg_notify('{NOTIFY_CHANNEL}', id::text) FROM added"
)


def event_ctes(
    event_id: uuid.UUID,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Mapping[str, Any],
    *,
    after: str,
    first: int,
    notify: bool = True,
) -> tuple[str, list[Any]]:
    """:func:`add_event` as CTEs of the caller's statement: ``event`` (the row) and ``woken``
    (its NOTIFY, or nothing when ``notify`` is False: the relay here leads and the writer rings
    ``Database.bell`` after its commit), written when the CTE named ``after`` returned a row;
    parameters numbered from ``first``. Select from ``woken`` (e.g. ``(SELECT count(*) FROM
    woken)``): Postgres runs a plain SELECT CTE only when it is used."""
    check_word(event_type, what="event type")
    n = first
    # The payload is the row id, as add_event sends it (the relay tells its own claims).
    wake = f"pg_notify('{NOTIFY_CHANNEL}', id::text)" if notify else "id"
    sql = (
        "event AS (INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type,"
        # headers: the current traceparent (the CloudEvents tracing extension), as add_event.
        f" payload, headers) SELECT ${n}, ${n + 1}, ${n + 2}, ${n + 3}, ${n + 4}::jsonb,"
        f" ${n + 5}::jsonb FROM {after}"
        f" LIMIT 1 RETURNING id), woken AS (SELECT {wake} FROM event)"
    )
    body = orjson.dumps(payload, default=str).decode()
    headers = traced_json()
    return sql, [event_id, aggregate_type, aggregate_id, event_type, body, headers]


def _check_headers(headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        if not _EXTENSION_NAME.match(name) or name in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is not a usable CloudEvents extension name")
        if not isinstance(value, str):
            raise ValueError(f"header {name!r} must be a string")


# The claim, one statement (public so tests can EXPLAIN it).
#
# SKIP LOCKED: two relays (or two batches of one relay) never claim the same row, and a
# stale relay never blocks us. But a row must not overtake an earlier unpublished row of
# its aggregate that someone else holds (a stale relay paused mid-batch, or the relay's
# own batch still waiting for its confirms): such rows come back flagged ``behind``; the
# caller leaves them unpublished, locked until it commits, for a later batch.
#
# OFFSET 0 keeps each NOT EXISTS a per-row subplan (an index probe on the aggregate's key).
# Without it Postgres turns them into anti-joins, and asyncpg's prepared statement keeps the
# plan made when the outbox was small - typically empty, at the relay's first batch: a nested
# loop scanning every unpublished row once per claimed row. That took ~0.9 s per claim on an
# 8,000-row backlog, and the relay fell seconds behind at 1,000 events/s.
CLAIM_SQL = """
WITH claimed AS (
    SELECT o.id, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type,
           o.payload::text AS payload, o.headers::text AS headers, o.created_at
      FROM outbox o
     WHERE o.published_at IS NULL AND o.quarantined_at IS NULL
       AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
       AND NOT EXISTS (
             SELECT 1 FROM outbox e
              WHERE e.aggregate_type = o.aggregate_type
                AND e.aggregate_id = o.aggregate_id
                AND e.published_at IS NULL
                AND e.id < o.id
                AND (e.quarantined_at IS NOT NULL OR e.next_attempt_at > now())
             OFFSET 0)
     ORDER BY o.id
     LIMIT $1
       FOR UPDATE OF o SKIP LOCKED)
SELECT c.*,
       EXISTS (SELECT 1 FROM outbox e
                WHERE e.aggregate_type = c.aggregate_type
                  AND e.aggregate_id = c.aggregate_id
                  AND e.published_at IS NULL
                  AND e.id < c.id
                  AND e.id NOT IN (SELECT id FROM claimed)
               OFFSET 0) AS behind
  FROM claimed c
 ORDER BY c.id
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """One claim: the rows to publish now, and the ids of rows locked but held back behind
    an earlier row of their aggregate that someone else holds (retry after that one)."""

    events: list[OutgoingEvent]
    held: list[int]

    @property
    def locked(self) -> int:
        return len(self.events) + len(self.held)


async def claim_batch(conn: DbConn, *, limit: int) -> Claim:
    """Lock up to ``limit`` due rows in id order, for the rest of the caller's transaction.

    Never a ``WHERE id > last_seen`` high-water mark: ids are taken at insert, not at commit,
    so a row with a smaller id can become visible after a larger one. A row is skipped while
    an earlier event of its aggregate is waiting out a backoff or is quarantined, and held
    back while another transaction holds one, so one aggregate's events never overtake each
    other.
    """
    rows = await conn.fetch(CLAIM_SQL, limit)
    return Claim(
        events=[_outgoing(r) for r in rows if not r["behind"]],
        held=[r["id"] for r in rows if r["behind"]],
    )


def _outgoing(row: asyncpg.Record) -> OutgoingEvent:
    return OutgoingEvent(
        id=row["event_id"],
        sequence=row["id"],
        aggregate_type=row["aggregate_type"],
        aggregate_id=row["aggregate_id"],
        event_type=row["event_type"],
        payload=orjson.loads(row["payload"]),
        headers=orjson.loads(row["headers"]),
        created_at=row["created_at"],
    )


_MARK = (
    "UPDATE outbox SET published_at = now(), attempts = attempts + 1,"
    " next_attempt_at = NULL WHERE id = ANY($1::bigint[])"
)
# The fence and the marks in one statement (one round trip less per batch): the token is
# recorded if no newer one was, and the rows are marked only if it was. A data-modifying CTE
# always runs; ``marked`` sees ``fenced``'s RETURNING rows.
_FENCE_AND_MARK = f"""
WITH fenced AS (
    INSERT INTO fencing_tokens AS f (resource, token) VALUES ($2, $3)
    ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token, updated_at = now()
        WHERE f.token <= EXCLUDED.token
    RETURNING token
), marked AS ({_MARK} AND EXISTS (SELECT FROM fenced) RETURNING 1)
SELECT EXISTS (SELECT FROM fenced) AS accepted, (SELECT count(*) FROM marked) AS marked
"""


async def mark_published(
    conn: DbConn, row_ids: Sequence[int], *, fence: tuple[str, int] | None = None
) -> bool:
    """Record the broker's confirms (only for rows it confirmed).

    With ``fence`` (resource, token), the token is checked in the same statement, like
    :func:`~ordermesh_shared.coordination.fence`: False, and nothing marked, when a newer
    token has been seen (the caller must roll back: it is a stale leader)."""
    if fence is None:
        if row_ids:
            await conn.execute(_MARK, list(row_ids))
        return True
    row = await conn.fetchrow(_FENCE_AND_MARK, list(row_ids), *fence)
    assert row is not None
    return bool(row["accepted"])


RECORD_FAILURES_SQL = """
UPDATE outbox o
   SET attempts = o.attempts + 1,
       last_error = f.error,
       next_attempt_at = now() + make_interval(
           secs => least($4::float8, $3::float8 * 2 ^ o.attempts) * (1 + random())),
       quarantined_at = CASE WHEN o.attempts + 1 >= $5 THEN now() END
  FROM unnest($1::bigint[], $2::text[]) AS f(id, error)
 WHERE o.id = f.id AND o.id = ANY($1::bigint[])
RETURNING o.id, o.quarantined_at IS NOT NULL AS quarantined,
          extract(epoch FROM o.next_attempt_at - now())::float8 AS retry_in
"""


async def record_failures(
    conn: DbConn, failures: Sequence[Failure], *, backoff: Backoff
) -> FailureRecord:
    """Count a failed attempt per row and schedule its retry, or quarantine it."""
    if not failures:
        return FailureRecord([], None)
    # The delay grows with the row's own attempts; jitter spreads rows that failed together.
    # "o.id = ANY(...)" besides the join: a plan cached while the outbox was small (a burst
    # of failures at start-up is typical) would otherwise join by scanning the whole table.
    rows = await conn.fetch(
        RECORD_FAILURES_SQL,
        [f.row_id for f in failures],
        [f.error[:2000] for f in failures],
        backoff.base,
        backoff.cap,
        backoff.max_attempts,
    )
    retries = [r["retry_in"] for r in rows if not r["quarantined"]]
    return FailureRecord(
        quarantined=sorted(r["id"] for r in rows if r["quarantined"]),
        next_retry_in=min(retries) if retries else None,
    )


async def outbox_lag(conn: DbConn) -> OutboxLag:
    """Unpublished count and oldest age (quarantined rows included), and the quarantined count."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS pending,
               coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest,
               count(*) FILTER (WHERE quarantined_at IS NOT NULL) AS quarantined
          FROM outbox WHERE published_at IS NULL
        """
    )
    assert row is not None
    return OutboxLag(row["pending"], max(0.0, row["oldest"]), row["quarantined"])


async def list_quarantined(conn: DbConn, *, limit: int = 100) -> list[QuarantinedRow]:
    """Quarantined rows, oldest first, with how many later events each one holds back."""
    rows = await conn.fetch(
        """
        SELECT q.id, q.event_id, q.aggregate_type, q.aggregate_id, q.event_type, q.attempts,
               q.last_error, q.created_at, q.quarantined_at,
               (SELECT count(*) FROM outbox l
                 WHERE l.aggregate_type = q.aggregate_type AND l.aggregate_id = q.aggregate_id
                   AND l.published_at IS NULL AND l.id > q.id) AS held_behind
          FROM outbox q
         WHERE q.quarantined_at IS NOT NULL AND q.published_at IS NULL
         ORDER BY q.id
         LIMIT $1
        """,
        limit,
    )
    return [QuarantinedRow(**dict(r)) for r in rows]


async def redrive(conn: DbConn, event_ids: Sequence[uuid.UUID] | None = None) -> list[uuid.UUID]:
    """Give quarantined rows (all of them when ``event_ids`` is None) a fresh set of attempts."""
    rows = await conn.fetch(
        f"""
        WITH redriven AS (
            UPDATE outbox
               SET quarantined_at = NULL, attempts = 0, next_attempt_at = NULL
             WHERE quarantined_at IS NOT NULL AND published_at IS NULL
               AND ($1::uuid[] IS NULL OR event_id = ANY($1::uuid[]))
            RETURNING event_id, id)
        SELECT event_id, pg_notify('{NOTIFY_CHANNEL}', '') FROM redriven ORDER BY id
        """,
        None if event_ids is None else list(event_ids),
    )
    return [r["event_id"] for r in rows]


PRUNE_SQL = """
DELETE FROM outbox WHERE id = ANY(ARRAY(
    SELECT id FROM outbox
     WHERE published_at < now() - make_interval(secs => $1)
     ORDER BY published_at LIMIT $2))
"""


async def prune_published(conn: DbConn, *, older_than_seconds: float, limit: int = 5000) -> int:
    """Delete up to ``limit`` rows published longer ago than ``older_than_seconds``."""
    # Oldest first along the published_at index (it stops at once when nothing is due), then
    # a primary-key probe per row: "id IN (subquery)" was planned as a scan of the table.
    result = await conn.execute(
        PRUNE_SQL,
        older_than_seconds,
        limit,
    )
    return int(result.split()[-1])
