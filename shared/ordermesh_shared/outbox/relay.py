"""The outbox relay: moves committed events from the outbox table to RabbitMQ, losing none.

One relay per service is active, chosen by a leader election; each of its batches runs in
one database transaction::

    claim (FOR UPDATE SKIP LOCKED, id order) -> publish (pipelined confirms, mandatory)
    -> fence (is my leadership token still the newest?) -> mark confirmed rows published,
    count failed attempts (quarantine after max_attempts) -> commit

A crash anywhere before the commit leaves the rows unpublished, so they are sent again:
delivery is at least once, and consumers' inbox makes it exactly-once in effect. A stale
leader (paused past its lease) is rejected at the fence and its transaction rolls back.

Two batches are in flight at once (``RelaySettings.pipeline``): as soon as one has claimed
its rows, the next may claim, so new rows do not wait for the broker's confirms and the
Postgres round trips of one batch overlap the publishing of the other. An aggregate's row
is never published while an earlier row of it is in another batch: the claim flags such a
row ``behind`` and holds it back (locked, unpublished), and it is looked at again when that
batch ends.

The relay wakes on ``LISTEN ordermesh_outbox`` (``add_event`` notifies on commit, with the
row id) and polls every ``poll_interval`` in case a notification is missed (e.g. while the
listener reconnects). A notification for a row the last batch already claimed starts no new
batch: under load most rows are claimed before their notification arrives, and each
needless claim was three round trips for nothing.

>>> relay = OutboxRelay(db, broker, service="order", fence=fence_for("order"))
>>> tasks.supervise(lambda: relay.run(election), name="outbox-relay")  # leads, relays, steps down
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import asyncpg
import structlog

from ordermesh_shared.coordination.errors import StaleToken
from ordermesh_shared.coordination.fencing import current_token, fence
from ordermesh_shared.database import Database, DbConn, loopback_ssl
from ordermesh_shared.messaging.envelope import OutgoingEvent
from ordermesh_shared.messaging.failures import ConnectionSource, is_transient
from ordermesh_shared.messaging.publisher import BatchOutcome, EventPublisher, describe
from ordermesh_shared.messaging.topology import Topology
from ordermesh_shared.outbox.metrics import OutboxMetrics
from ordermesh_shared.outbox.status import RelayStatus
from ordermesh_shared.outbox.store import (
    NOTIFY_CHANNEL,
    Backoff,
    Claim,
    Failure,
    claim_batch,
    mark_published,
    prune_published,
    record_failures,
)
from ordermesh_shared.tracing import publish_span

log = structlog.get_logger(__name__)


_PRUNE_CHUNK = 5000  # rows per DELETE
_PRUNE_ROUNDS = 100  # DELETEs per prune, at most (500,000 rows per prune_interval)


class FencedOut(Exception):
    """A newer relay leader has written to the outbox: this one must stop (raised by ``Fence``).

    ``token`` is the refused term's, ``current`` the newer one the fence holds (when known).
    """

    def __init__(self, message: str, *, token: int | None = None, current: int | None = None):
        super().__init__(message)
        self.token = token
        self.current = current


class LeaderTerm(Protocol):
    """One leadership term: ``token`` fences writes, ``lost`` is set when it ends."""

    @property
    def token(self) -> int: ...

    @property
    def lost(self) -> asyncio.Event: ...


class Leadership(Protocol):
    """What the relay needs from an election (``coordination.Election`` satisfies it)."""

    async def run_while_leader(self, work: Callable[[LeaderTerm], Awaitable[None]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Fence:
    """The relay's fence: its leadership token must be the newest ``resource`` has seen when
    it marks rows published (``resource`` None: unfenced, for a :class:`SoleLeader`)."""

    resource: str | None = None

    async def check(self, conn: DbConn, token: int) -> None:
        """Record ``token`` now (inside ``conn``'s transaction) or raise :class:`FencedOut`."""
        if self.resource is None:
            return
        try:
            await fence(conn, resource=self.resource, token=token)
        except StaleToken as exc:
            raise FencedOut(str(exc), token=exc.token, current=exc.current) from exc

    async def mark(self, conn: DbConn, row_ids: Sequence[int], token: int) -> None:
        """Mark ``row_ids`` published, the token checked in the same statement."""
        where = None if self.resource is None else (self.resource, token)
        if not await mark_published(conn, row_ids, fence=where):
            assert self.resource is not None
            current = await current_token(conn, resource=self.resource)
            stale = StaleToken(self.resource, token, current or 0)
            raise FencedOut(str(stale), token=token, current=current) from stale


# Test hook: runs after the broker confirmed a batch and before the rows are marked.
AfterConfirm = Callable[[Sequence[OutgoingEvent]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _SoleTerm:
    token: int
    lost: asyncio.Event


class SoleLeader:
    """Always the leader, with token 0: for a deployment that runs exactly one relay itself.

    >>> await relay.run(SoleLeader())      # no etcd; never run two of these for one database
    """

    async def run_while_leader(self, work: Callable[[LeaderTerm], Awaitable[None]]) -> NoReturn:
        while True:
            try:
                await work(_SoleTerm(token=0, lost=asyncio.Event()))
            except Exception as exc:  # like the election: log, back off, run the work again
                log.error("outbox.relay_failed", exc_info=exc)
            await asyncio.sleep(1.0)


# The fence of a :class:`SoleLeader` relay: nothing else writes, nothing to check.
no_fence = Fence()


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Tuning; the defaults suit a service, tests shorten the times.

    >>> RelaySettings(batch_size=100, poll_interval=0.5, retry=Backoff(base=0.05, max_attempts=3))
    """

    batch_size: int = 500
    # Batches in flight at once: while one waits for the broker's confirms (and then for
    # Postgres to mark and commit), the next claims and publishes. 1: one at a time.
    pipeline: int = 2
    publish_timeout: float = 5.0
    poll_interval: float = 2.0
    # Under load, claims are spaced at least this far apart, so a batch carries the events
    # of that moment instead of one each; after a quiet spell the first event goes at once.
    linger: float = 0.005
    retry: Backoff = field(default_factory=Backoff)  # of a failed event; then quarantine
    error_backoff_max: float = 5.0  # while the database or broker is down
    prune_after: float = 7 * 24 * 3600.0  # keep published rows this long (for audits)
    prune_interval: float = 600.0
    # A leader refused at the fence when its term starts keeps the term this long (asking
    # again every poll_interval), then steps down: a new term has a new token.
    fenced_hold: float = 30.0


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one batch did (for logs, metrics and tests)."""

    claimed: int
    published: int
    failed: int
    held: int
    quarantined: Sequence[int]
    outage: str | None


class OutboxRelay:
    """Relays one service's outbox to the events exchange while it holds leadership.

    >>> relay = OutboxRelay(db, broker, service="payment", fence=fence, metrics=metrics)
    >>> await relay.run(election)              # forever; cancel to stop
    >>> report = await relay.relay_batch(token=7)   # one batch by hand (tests, benchmarks)
    """

    def __init__(
        self,
        db: Database,
        broker: ConnectionSource,
        *,
        service: str,
        fence: Fence = no_fence,
        settings: RelaySettings | None = None,
        topology: Topology | None = None,
        metrics: OutboxMetrics | None = None,
        after_confirm: AfterConfirm | None = None,
    ) -> None:
        self.service = service
        self.settings = settings or RelaySettings()
        self.status = RelayStatus(service)  # for /health/ready and the admin API
        self._db = db
        self._fence = fence
        self._metrics = metrics
        self._after_confirm = after_confirm
        self._publisher = EventPublisher(
            broker,
            service=service,
            topology=topology or Topology(),
            timeout=self.settings.publish_timeout,
        )
        self._retry_at: float | None = None
        self._pruned_at = 0.0
        self._notified: set[int] = set()  # row ids notified and not yet seen claimed
        self._look_anyway = False  # a wake-up without a row id: claim whatever is there
        self._last_full = False  # the last claim locked a full batch: there may be more
        self._in_flight = 0  # own batches between their claim and their commit
        self._held_for_later: set[int] = set()  # held behind an own batch: look at its end
        self._wakeup: asyncio.Event | None = None
        self._rung_seen = 0  # db.bell.rung at the last claim's start
        self._claimed_at = 0.0  # monotonic time of the last claim's start
        # Notifications often arrive after their row was claimed: those wake nobody.
        self._claimed = _RecentIds(limit=4 * self.settings.batch_size)
        # A frozen relay must not hold its claimed rows for ever: the pool ends transactions
        # idle past its limit (Database: 30 s). A batch publishes for as long as confirms keep
        # coming (the publish timeout is a gap between them), so a long publish timeout
        # raises the limit, per batch.
        self._idle_limit = max(30.0, 6 * self.settings.publish_timeout)

    async def run(self, leadership: Leadership) -> None:
        """Campaign, and relay while leading; runs until cancelled."""
        try:
            await leadership.run_while_leader(self._lead)
        finally:
            await self._publisher.close()

    async def relay_batch(self, token: int) -> BatchReport:
        """Claim, publish, fence and mark one batch in one transaction."""
        return await self._batch(token)

    async def _batch(self, token: int, claimed: Callable[[], None] | None = None) -> BatchReport:
        """One batch; ``claimed`` is called once its rows are locked (the next may claim)."""
        await self._publisher.ready()  # no claim (and no open transaction) while it is down
        started = time.perf_counter()
        held: list[int] = []
        siblings = self._in_flight
        in_flight = False
        try:
            async with self._db.pool.acquire() as conn, conn.transaction():
                if self._idle_limit > self._db.idle_in_transaction_timeout:
                    await _limit_idle_time(conn, self._idle_limit)
                claim = await self._claim(conn)
                held, siblings = claim.held, max(siblings, self._in_flight)
                if claim.locked:  # counted while it holds locks, events or only held rows
                    self._in_flight += 1
                    in_flight = True
                if claimed is not None:
                    claimed()
                if not claim.events:
                    return BatchReport(0, 0, 0, 0, (), None)
                with publish_span(claim.events, service=self.service):
                    outcome = await self._publisher.publish(claim.events)
                if self._after_confirm is not None:
                    await self._after_confirm(outcome.confirmed)
                quarantined = await self._record(conn, outcome, token)
        finally:
            if in_flight:
                self._in_flight -= 1
            self._batch_ended(held if siblings else [])
        report = self._report(claim.events, outcome, quarantined)
        self._observe(report, time.perf_counter() - started)
        return report

    async def _claim(self, conn: DbConn) -> Claim:
        # Rows notified before the claim are visible to it: whether it takes them or not
        # (held back, or another relay's), they need no batch of their own.
        seen_before = set(self._notified)
        self._look_anyway = False
        # Rung before the claim: committed before it, so visible to it.
        self._rung_seen = self._db.bell.rung
        self._claimed_at = time.monotonic()
        claim = await claim_batch(conn, limit=self.settings.batch_size)
        for event in claim.events:
            self._claimed.add(event.sequence)
        self._notified.difference_update(seen_before)
        self._notified.difference_update(e.sequence for e in claim.events)
        # A full claim means more rows may wait - unless it publishes nothing: rows held back
        # behind a lock would come back at once, claim after claim, until that lock goes.
        self._last_full = bool(claim.events) and claim.locked >= self.settings.batch_size
        return claim

    def _batch_ended(self, held: list[int]) -> None:
        """Rows held back behind one of our own batches: look again when the next batch
        ends, or at once when none is left in flight (a look too early only holds them
        again, until a later end). Rows held behind another process's lock (a stale relay)
        wait for the poll."""
        if self._held_for_later:
            self._notified.update(self._held_for_later)
            self._held_for_later.clear()
            self._wake()
        self._held_for_later.update(held)
        if self._in_flight == 0 and self._held_for_later:
            self._batch_ended([])  # nothing of ours in flight any more: look now

    async def claim_fence(self, token: int) -> None:
        """Record our token at once, so a stale leader's next marks fail even if we have
        nothing to publish yet."""
        async with self._db.pool.acquire() as conn, conn.transaction():
            await self._fence.check(conn, token)

    async def _record(self, conn: DbConn, outcome: BatchOutcome, token: int) -> list[int]:
        # Fenced even with nothing confirmed: a stale leader must not count failures either.
        await self._fence.mark(conn, [e.sequence for e in outcome.confirmed], token)
        failures = [Failure(e.sequence, describe(exc)) for e, exc in outcome.failed]
        record = await record_failures(conn, failures, backoff=self.settings.retry)
        if record.next_retry_in is not None:
            retry_at = time.monotonic() + record.next_retry_in
            if self._retry_at is None or retry_at < self._retry_at:
                self._retry_at = retry_at
                self._wake()  # the worker waiting for work computed its wait without it
        return record.quarantined

    def _report(
        self, events: Sequence[OutgoingEvent], outcome: BatchOutcome, quarantined: list[int]
    ) -> BatchReport:
        report = BatchReport(
            claimed=len(events),
            published=len(outcome.confirmed),
            failed=len(outcome.failed),
            held=len(outcome.held),
            quarantined=quarantined,
            outage=None if outcome.outage is None else describe(outcome.outage),
        )
        for event, exc in outcome.failed:
            log.warning("outbox.publish_failed", event_id=str(event.id), error=describe(exc))
        if quarantined:
            log.error("outbox.quarantined", rows=quarantined, hint="re-drive via the admin API")
        return report

    def _observe(self, report: BatchReport, seconds: float) -> None:
        if self._metrics is None:
            return
        self._metrics.published.inc(report.published)
        self._metrics.failures.labels("event").inc(report.failed)
        if report.outage is not None:
            self._metrics.failures.labels("broker").inc()
        self._metrics.quarantined_total.inc(len(report.quarantined))
        self._metrics.batch_seconds.observe(seconds)

    async def _lead(self, term: LeaderTerm) -> None:
        log.info("outbox.relay_leading", service=self.service, token=term.token)
        if self._metrics is not None:
            self._metrics.leader.set(1)
        try:
            async with self._wakeups() as wakeup:
                await self._relay_until_lost(term, wakeup)
        finally:
            self.status.standby()
            if self._metrics is not None:
                self._metrics.leader.set(0)
                self._metrics.fenced_out.set(0)

    async def _relay_until_lost(self, term: LeaderTerm, wakeup: asyncio.Event) -> None:
        if not await self._fence_in(term):
            return
        self._wakeup = wakeup
        self._db.bell.lead(wakeup)  # writers here stop notifying and ring instead
        self._look_anyway = True  # rows may be waiting from before this term
        ended = asyncio.Event()  # fenced out: every worker stops
        turn = asyncio.Lock()  # one worker at a time waits for work and claims
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(max(1, self.settings.pipeline)):
                    group.create_task(self._work(term, turn, ended))
        except BaseExceptionGroup as failed:  # a bug in a worker: report it, not a group
            for other in failed.exceptions[1:]:
                log.error("outbox.relay_worker_failed", exc_info=other)
            raise failed.exceptions[0] from None
        finally:
            self._db.bell.step_down()
            self._wakeup = None

    async def _fence_in(self, term: LeaderTerm) -> bool:
        """Record our token before the first batch; False if the term ended first.

        A refused term is kept for ``fenced_hold``, the fence asked again every poll
        interval. Stepping down at once would not help: a stale leader's lease is gone
        (``term.lost`` ends it), so a live term that is refused means etcd's revisions went
        backwards (etcd lost its data), and every contender would be refused alike. Holding
        on keeps this instance reporting it (``status``, readiness) and relaying within a
        poll interval of an operator's re-base. It does step down in the end: a new term's
        token may have passed the fence by then (etcd's revision keeps growing).
        """
        trouble = 0
        refused_at: float | None = None
        while not term.lost.is_set():
            try:
                await self.claim_fence(term.token)
            except FencedOut as exc:
                self._fenced(term, exc, first=refused_at is None)
                refused_at = time.monotonic() if refused_at is None else refused_at
                if time.monotonic() - refused_at >= self.settings.fenced_hold:
                    return False
                await _wait(term.lost, self.settings.poll_interval)
                continue
            except Exception as exc:
                if not is_transient(exc):
                    raise
                trouble += 1
                await self._back_off(trouble, exc)
                continue
            self._fenced_in(term, after_refusal=refused_at is not None)
            return True
        return False

    def _fenced_in(self, term: LeaderTerm, *, after_refusal: bool) -> None:
        if after_refusal:
            log.warning("outbox.relay_fence_accepted", service=self.service, token=term.token)
        self.status.leading(term_token=term.token)
        if self._metrics is not None:
            self._metrics.fenced_out.set(0)

    async def _work(self, term: LeaderTerm, turn: asyncio.Lock, ended: asyncio.Event) -> None:
        """One pipeline worker: take the turn, wait for work, claim, pass the turn on, then
        publish, fence and mark while the next worker claims."""
        trouble = 0
        while not (term.lost.is_set() or ended.is_set()):
            report = None
            async with _Turn(turn) as mine:
                try:
                    if await self._idle(ended):
                        report = await self._batch(term.token, claimed=mine.pass_on)
                        await self._maybe_prune()
                except FencedOut as exc:
                    self._fenced(term, exc)
                    ended.set()
                    self._wake()  # a worker waiting for work stops too
                    return
                except Exception as exc:
                    if not is_transient(exc):
                        raise  # a bug: the election logs it and runs the work again
                    mine.pass_on()
                    trouble += 1
                    await self._back_off(trouble, exc)
                    self._look_again()  # what that batch had claimed is still there
                    continue
            if report is None:
                continue
            trouble = 0 if report.outage is None else trouble + 1
            if report.outage is not None:
                await self._back_off(trouble, report.outage)
                self._look_again()  # the held rows are due again

    async def _idle(self, ended: asyncio.Event) -> bool:
        """Wait until there may be rows to claim; False when the term ended meanwhile."""
        if not self._due():
            wakeup = self._wakeup
            assert wakeup is not None
            wakeup.clear()
            await _wait(wakeup, self._idle_wait())
        await self._linger()
        return not ended.is_set()

    def _due(self) -> bool:
        rung = self._db.bell.rung > self._rung_seen
        return self._last_full or self._look_anyway or bool(self._notified) or rung

    async def _linger(self) -> None:
        """Space claims ``linger`` apart: under load the next batch gathers what arrives
        meanwhile (each batch costs the same four round trips, whatever it carries); a claim
        after a quiet spell, or behind a full one, goes at once."""
        wait = self._claimed_at + self.settings.linger - time.monotonic()
        if wait > 0 and not self._last_full:
            await asyncio.sleep(wait)

    def _fenced(self, term: LeaderTerm, exc: FencedOut, *, first: bool = True) -> None:
        self.status.fenced_out(term_token=term.token, stored_token=exc.current)
        if not first:
            return  # the same term, asking again: said and counted once
        log.warning("outbox.relay_fenced", token=term.token, stored=exc.current, error=str(exc))
        if self._metrics is not None:
            self._metrics.fenced.inc()
            self._metrics.fenced_out.set(1)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _look_again(self) -> None:
        # With the flag, a wake-up: the other worker may be the one waiting for work.
        self._look_anyway = True
        self._wake()

    def _on_notify(self, wakeup: asyncio.Event, payload: str) -> None:
        if payload.isdigit():
            if int(payload) in self._claimed:
                return  # already claimed by a batch: nothing new to do
            self._notified.add(int(payload))
        else:  # (re)connected, or a re-drive: there may be rows nobody told us about
            self._look_anyway = True
        wakeup.set()

    async def _back_off(self, trouble: int, problem: BaseException | str) -> None:
        cap = self.settings.error_backoff_max
        delay = min(cap, 0.05 * 2**trouble) * random.uniform(0.5, 1.0)
        error = problem if isinstance(problem, str) else describe(problem)
        log.warning("outbox.relay_waiting", error=error, retry_in=round(delay, 3))
        await asyncio.sleep(delay)

    def _idle_wait(self) -> float:
        wait = self.settings.poll_interval
        if self._retry_at is not None:
            wait = min(wait, max(0.0, self._retry_at - time.monotonic()))
            if self._retry_at <= time.monotonic():
                self._retry_at = None
        return wait

    async def _maybe_prune(self) -> None:
        if time.monotonic() - self._pruned_at < self.settings.prune_interval:
            return
        self._pruned_at = time.monotonic()
        pruned = 0
        # Chunks of _PRUNE_CHUNK (short statements), until caught up: one chunk per interval
        # would fall behind any service publishing more than ~8 events/s.
        for _ in range(_PRUNE_ROUNDS):
            async with self._db.pool.acquire() as conn:
                deleted = await prune_published(
                    conn, older_than_seconds=self.settings.prune_after, limit=_PRUNE_CHUNK
                )
            pruned += deleted
            if deleted < _PRUNE_CHUNK:
                break
        if pruned:
            log.info("outbox.pruned", rows=pruned)

    @contextlib.asynccontextmanager
    async def _wakeups(self) -> AsyncIterator[asyncio.Event]:
        wakeup = asyncio.Event()
        listener = asyncio.create_task(self._listen(wakeup), name="outbox-listen")
        try:
            yield wakeup
        finally:
            listener.cancel()
            await asyncio.wait({listener})

    async def _listen(self, wakeup: asyncio.Event) -> None:
        """Hold a LISTEN connection, reconnecting with backoff; the poll covers the gaps."""
        trouble = 0
        while True:
            try:
                await _listen_until_closed(self._db.dsn, lambda p: self._on_notify(wakeup, p))
                trouble = 0
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                trouble += 1
                log.debug("outbox.listen_failed", error=str(exc))
            await asyncio.sleep(min(self.settings.error_backoff_max, 0.1 * 2**trouble))


async def _limit_idle_time(conn: DbConn, seconds: float) -> None:
    await conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', $1, true)",
        f"{int(seconds * 1000)}ms",
    )


class _Turn:
    """Holds the pipeline's turn until ``pass_on()`` (called once a batch has claimed) or
    the end of the block, whichever comes first."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock
        self._held = False

    async def __aenter__(self) -> _Turn:
        await self._lock.acquire()
        self._held = True
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.pass_on()

    def pass_on(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


class _RecentIds:
    """The last ``limit`` ids added, for membership tests."""

    def __init__(self, *, limit: int) -> None:
        self._order: deque[int] = deque()
        self._members: set[int] = set()
        self._limit = limit

    def add(self, value: int) -> None:
        if value in self._members:
            return
        self._order.append(value)
        self._members.add(value)
        if len(self._order) > self._limit:
            self._members.discard(self._order.popleft())

    def __contains__(self, value: int) -> bool:
        return value in self._members


async def _listen_until_closed(dsn: str, notified: Callable[[str], None]) -> None:
    conn = await asyncpg.connect(dsn, timeout=3, ssl=loopback_ssl(dsn))
    closed = asyncio.Event()
    try:
        conn.add_termination_listener(lambda _c: closed.set())
        # asyncpg calls listeners with (connection, pid, channel, payload).
        await conn.add_listener(NOTIFY_CHANNEL, lambda *args: notified(str(args[-1])))
        notified("")  # rows may have been committed while we were not listening
        await closed.wait()
    finally:
        with contextlib.suppress(Exception):  # a broken connection has nothing to close
            await conn.close(timeout=2)


async def _wait(event: asyncio.Event, timeout: float) -> None:  # noqa: ASYNC109
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
