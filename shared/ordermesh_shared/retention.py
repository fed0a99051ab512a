"""Retention: a supervised loop that deletes rows older than their table's retention.

Tables that only ever grow: consumers' ``inbox``, participants' ``idempotency_keys``, the
order ``order_timeline`` and the ``saga_steps`` of finished sagas (completed or cancelled;
running and parked ones keep theirs whatever their age). Published outbox rows are pruned by
the relay itself (``outbox/relay.py``). A table is pruned only where it exists: the timeline
and saga tables are the order service's.

Each statement deletes at most ``batch`` rows, picked with ``FOR UPDATE SKIP LOCKED``: short
row locks, and replicas sharing a database split the work instead of waiting on each other
(so every replica may prune, no election needed). A pass repeats a table's statement while
it deleted a full batch.

>>> pruner = Pruner(db, retention_rules(settings), interval=60, pruned=metrics.pruned_rows)
>>> tasks.supervise(pruner.run, name="retention")   # shows in /health/ready details
>>> await pruner.prune_once()                        # {"inbox": 1200, ...}
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import Counter

from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.database import Database, DbConn
from ordermesh_shared.transient import is_transient

log = structlog.get_logger(__name__)

DAY = 86400.0
DEFAULT_BATCH = 1000  # rows per DELETE: each statement holds its row locks only briefly

# $1: retention in seconds, $2: batch size. Oldest first along the column's index; the
# DELETE then finds each row by its ctid (a TID scan, no second search).
_BY_AGE = """
DELETE FROM {table} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {table}
     WHERE {column} < now() - make_interval(secs => $1)
     ORDER BY {column} LIMIT $2
       FOR UPDATE SKIP LOCKED))
"""

# Only sagas in a final status (running, compensating and parked compensation_failed ones are
# still needed: recovery and re-drive read their steps), finished longer ago than retention.
# The steps' started_at (indexed) is older than their saga's end, so the scan starts there;
# the saga is looked up by its key per step (a correlated subquery, never turned into a join
# that would read the whole, ever-growing sagas table on each batch).
_FINISHED_SAGA_STEPS = """
DELETE FROM saga_steps WHERE ctid = ANY(ARRAY(
    SELECT st.ctid FROM saga_steps st
     WHERE st.started_at < now() - make_interval(secs => $1)
       AND (SELECT s.status IN ('completed', 'cancelled')
                   AND s.updated_at < now() - make_interval(secs => $1)
              FROM sagas s WHERE s.id = st.saga_id)
     ORDER BY st.started_at LIMIT $2
       FOR UPDATE OF st SKIP LOCKED))
"""


@dataclass(frozen=True, slots=True)
class PruneRule:
    """One table's pruning: ``sql`` deletes one batch of rows older than ``keep_for`` seconds.

    ``keep_for`` 0 keeps every row; ``needs`` are the tables that must exist in the database.
    """

    table: str
    keep_for: float
    sql: str
    needs: tuple[str, ...]

    @classmethod
    def by_age(cls, table: str, column: str, *, keep_for: float) -> PruneRule:
        """Rows of ``table`` whose ``column`` (a timestamp) is older than ``keep_for``."""
        return cls(table, keep_for, _BY_AGE.format(table=table, column=column), (table,))

    @classmethod
    def finished_saga_steps(cls, *, keep_for: float) -> PruneRule:
        """Steps of completed or cancelled sagas that ended longer ago than ``keep_for``."""
        return cls("saga_steps", keep_for, _FINISHED_SAGA_STEPS, ("saga_steps", "sagas"))


def retention_rules(settings: ServiceSettings) -> list[PruneRule]:
    """The rules of every table a service may have, with the settings' retentions."""
    history = settings.history_retention_days * DAY
    return [
        PruneRule.by_age(
            "idempotency_keys", "created_at", keep_for=settings.idempotency_retention_days * DAY
        ),
        PruneRule.by_age("inbox", "received_at", keep_for=settings.inbox_retention_days * DAY),
        PruneRule.by_age("order_timeline", "received_at", keep_for=history),
        PruneRule.finished_saga_steps(keep_for=history),
    ]


class Pruner:
    """Every ``interval`` seconds, deletes what the rules say is past retention.

    Transient errors (the database away) are logged and waited out until the next pass; any
    other error ends :meth:`run` for the supervisor to log and restart it.

    >>> pruner = Pruner(db, [PruneRule.by_age("inbox", "received_at", keep_for=7 * DAY)])
    >>> tasks.supervise(pruner.run, name="retention")
    """

    def __init__(
        self,
        db: Database,
        rules: Sequence[PruneRule],
        *,
        interval: float = 60.0,
        batch: int = DEFAULT_BATCH,
        pruned: Counter | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._db = db
        self._rules = [rule for rule in rules if rule.keep_for > 0]
        self._interval = interval
        self._batch = batch
        self._pruned = pruned

    async def run(self) -> None:
        """Wait ``interval``, then prune, for ever (the first pass leaves start-up alone)."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.prune_once()
            except Exception as exc:
                if not is_transient(exc):
                    raise  # the supervisor logs it and restarts the loop
                log.warning("retention.unavailable", error=f"{type(exc).__name__}: {exc}")

    async def prune_once(self) -> dict[str, int]:
        """One pass over every table that exists here; returns the rows deleted per table."""
        if not self._rules:
            return {}
        async with self._db.pool.acquire() as conn:
            present = await _existing_tables(conn, {t for r in self._rules for t in r.needs})
        counts = {}
        for rule in self._rules:
            if present.issuperset(rule.needs):
                counts[rule.table] = await self._prune(rule)
        if any(counts.values()):
            log.info("retention.pruned", rows={table: n for table, n in counts.items() if n})
        return counts

    async def _prune(self, rule: PruneRule) -> int:
        total = 0
        while True:
            # One statement per batch (autocommit): its locks go as soon as it is done.
            async with self._db.pool.acquire() as conn:
                deleted = _row_count(await conn.execute(rule.sql, rule.keep_for, self._batch))
            total += deleted
            if self._pruned is not None and deleted:
                self._pruned.labels(rule.table).inc(deleted)
            if deleted < self._batch:
                return total


async def _existing_tables(conn: DbConn, names: set[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NOT NULL",
        sorted(names),
    )
    return {row["name"] for row in rows}


def _row_count(status: str) -> int:
    # asyncpg returns the command tag, e.g. "DELETE 1000".
    return int(status.split()[-1])
