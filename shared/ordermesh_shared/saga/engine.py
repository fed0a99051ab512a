"""The saga orchestrator: runs sagas forward, compensates in reverse, resumes after crashes.

A saga runs on time budgets of its own, never on the deadline of the request that started it
(a client's ``X-Deadline-Ms`` of 300 ms must not strand an order): the forward deadline of
the policy, ``step.timeout`` per attempt, and a fresh ``step.timeout`` for every attempt of a
compensation.

State is persisted before and after every step; a step's compensation is registered before
its action runs; compensations are shielded from cancellation and retried with backoff
until they succeed or, past a limit, the saga is parked as ``compensation_failed`` with the
reason (visible, and resumable with :meth:`SagaEngine.reopen`). A recovery loop takes over
sagas whose owner died and re-sends the in-doubt step with the same idempotency key.

Traced (when tracing is on): a span per saga run and per step (``forward reserve_stock``,
``compensate reserve_stock``), failed attempts as the step span's events, its outcome as its
status. The trace context the saga started in is stored with it, so a run resumed elsewhere
continues that trace (linked to whatever resumed it).

>>> async with SagaEngine(db.pool, owner=instance_id, definitions=[PLACE_ORDER]) as engine:
...     async with pool.acquire() as conn, conn.transaction():
...         await engine.create(conn, PLACE_ORDER, saga_id, order_input)   # with the order row
...     engine.launch(saga_id)                                              # after commit
...     await engine.wait(saga_id, timeout=2.0)            # False if still running here
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import asyncpg
import structlog
from opentelemetry.trace import Span
from prometheus_client import CollectorRegistry

from ordermesh_shared.database import Database, DbConn
from ordermesh_shared.resilience.deadline import own_deadline, without_deadline
from ordermesh_shared.saga.definition import (
    TERMINAL,
    SagaDefinition,
    SagaOutcome,
    SagaPolicy,
    Step,
    StepCall,
    StepFailed,
    StepResults,
)
from ordermesh_shared.saga.metrics import SagaMetrics
from ordermesh_shared.saga.store import (
    LostOwnership,
    PostgresSagaStore,
    SagaRow,
    SagaStore,
    StepDone,
    insert_saga_cte,
)
from ordermesh_shared.tasks import BackgroundTasks
from ordermesh_shared.tracing import (
    attempt_failed,
    current_traceparent,
    saga_span,
    step_outcome,
    step_span,
)
from ordermesh_shared.transient import is_transient

log = structlog.get_logger(__name__)


class GaveUp(Exception):
    """A step kept failing with faults until the saga's forward deadline passed."""


class SagaEngine:
    """Owns the running sagas of one process, its lease heartbeat and the recovery loop."""

    def __init__(
        self,
        pool: asyncpg.Pool | Database | None,
        *,
        owner: str,
        definitions: Iterable[SagaDefinition[Any]],
        policy: SagaPolicy | None = None,
        tasks: BackgroundTasks | None = None,
        metrics: SagaMetrics | None = None,
        store: SagaStore | None = None,
    ) -> None:
        """``tasks``: the service's supervisor (its loops then show in readiness); by default
        the engine supervises its heartbeat and recovery loops itself. ``metrics``: where the
        engine's series go (by default a registry nobody scrapes). ``store``: where sagas are
        kept (by default Postgres through ``pool``; unit tests pass an in-memory store)."""
        # A Database hands out its pool only once migrated; the loops wait for that.
        self._source = pool
        self.instance = owner
        # A fresh suffix per run: a restarted instance recognises its predecessor's sagas.
        self.owner = f"{owner}/{uuid.uuid4().hex[:8]}"
        self._definitions = {d.name: d for d in definitions}
        self.policy = policy or SagaPolicy()
        self._running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._compensations: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._own_tasks = tasks is None
        self._tasks = tasks or BackgroundTasks()
        self.metrics = metrics or SagaMetrics(CollectorRegistry())
        self.metrics.count_in_flight(lambda: self.in_flight)
        self._store: SagaStore = store or PostgresSagaStore(lambda: self._pool)

    @property
    def in_flight(self) -> int:
        """Sagas running in this process now, forward or compensating (a compensation runs
        inside its saga's task): what load shedding bounds."""
        return len(self._running)

    @property
    def _pool(self) -> asyncpg.Pool:
        if self._source is None:
            raise RuntimeError("a SagaEngine without a pool needs a store")
        return self._source.pool if isinstance(self._source, Database) else self._source

    async def __aenter__(self) -> SagaEngine:
        if self._own_tasks:
            await self._tasks.__aenter__()
        # Supervised: a failure that escapes a tick is logged and the loop restarted.
        self._loops = [
            self._tasks.supervise(self._heartbeat, name="saga-heartbeat"),
            self._tasks.supervise(self._recover, name="saga-recovery"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in [*self._loops, *self._running.values()]:
            task.cancel()
        if self._compensations:
            # Let undo work finish if it can; what cannot is resumed by the next owner.
            await asyncio.wait(self._compensations, timeout=self.policy.shutdown_grace)
        for task in self._compensations:
            task.cancel()
        pending = [*self._loops, *self._running.values(), *self._compensations]
        await asyncio.gather(*pending, return_exceptions=True)
        if self._own_tasks:
            await self._tasks.__aexit__(exc_type, exc, tb)

    async def create(
        self, conn: DbConn, definition: SagaDefinition[Any], saga_id: uuid.UUID, value: Any
    ) -> SagaRow:
        """Persist a new saga in the caller's transaction; :meth:`launch` it after commit
        (passing the row returned here saves re-reading it)."""
        row = self._new_row(definition, saga_id, value)
        await self._store.insert(
            conn,
            saga_id,
            definition.name,
            row.input,
            owner=self.owner,
            ttl=self.policy.lease_ttl,
            traceparent=row.traceparent,
        )
        return row

    def prepare(
        self, definition: SagaDefinition[Any], saga_id: uuid.UUID, value: Any
    ) -> PreparedSaga:
        """A new saga as part of the caller's own statement (Postgres store only): embed
        ``ctes(after, first)`` and ``args``, then :meth:`launch` ``row`` once it committed.
        It saves the round trips of a transaction around :meth:`create`."""
        return PreparedSaga(
            self._new_row(definition, saga_id, value), self.owner, self.policy.lease_ttl
        )

    @staticmethod
    def _new_row(definition: SagaDefinition[Any], saga_id: uuid.UUID, value: Any) -> SagaRow:
        # Stored with the row, the creating request's trace outlives a crash before any step.
        payload = dict(definition.encode(value))
        traceparent = current_traceparent()
        return SagaRow(
            saga_id, definition.name, "running", payload, {}, 0, None, value, traceparent
        )

    def launch(self, saga_id: uuid.UUID, created: SagaRow | None = None) -> None:
        """Run the saga in the background (no-op if it already runs in this process).

        ``created``: what :meth:`create` returned, when this process just created it.
        """
        if saga_id in self._running:
            return
        # Not the launching request's deadline (create_task would copy it): the saga's own.
        task = asyncio.create_task(
            self._run(saga_id, created), name=f"saga-{saga_id}", context=without_deadline()
        )
        self._running[saga_id] = task
        task.add_done_callback(lambda t: self._done(saga_id, t))

    async def wait(self, saga_id: uuid.UUID, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to ``timeout`` s for the saga to end here; False if it still runs here.

        A saga that does not run in this process (it ended, or runs elsewhere: a replayed
        request) is not waited for at all. Nothing is kept per waiter: it waits on the saga's
        task itself, which it never cancels.
        """
        task = self._running.get(saga_id)
        if task is None:
            return True
        done, _ = await asyncio.wait({task}, timeout=timeout)
        return bool(done)

    async def reopen(self, conn: DbConn, saga_id: uuid.UUID) -> bool:
        """Resume compensating a parked saga (in the caller's transaction; launch after)."""
        return await self._store.reopen(conn, saga_id, self.owner, self.policy.lease_ttl)

    def _done(self, saga_id: uuid.UUID, task: asyncio.Task[None]) -> None:
        self._running.pop(saga_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("saga.crashed", saga_id=str(saga_id), exc_info=exc)

    async def _run(self, saga_id: uuid.UUID, created: SagaRow | None) -> None:
        # The saga's own task (and its compensation's, a copy): every line logged while it
        # runs names it, the step clients' included.
        structlog.contextvars.bind_contextvars(saga_id=str(saga_id))
        launched_in = current_traceparent()  # the request that created it, if any
        try:
            saga = created or await self._store.load(saga_id)
            if saga is None or saga.status in TERMINAL:
                return
            with saga_span(saga.name, saga_id, stored=saga.traceparent, resumed=not created):
                origin = saga.traceparent or launched_in or current_traceparent()
                await self._run_phases(replace(saga, traceparent=origin), fresh=bool(created))
        except LostOwnership:
            log.warning("saga.taken_over", saga_id=str(saga_id))

    async def _run_phases(self, saga: SagaRow, *, fresh: bool) -> None:
        definition = self._definitions[saga.name]
        if saga.status == "running":
            # A saga just created has no step log yet: nothing to read back.
            statuses = {} if fresh else await self._statuses(saga.id)
            saga = await self._forward(definition, saga, statuses)
        if saga.status == "compensating":
            await self._shielded_compensation(definition, saga)

    # -- forward ---------------------------------------------------------------------------

    async def _forward(
        self,
        definition: SagaDefinition[Any],
        saga: SagaRow,
        statuses: dict[tuple[str, str], str],
    ) -> SagaRow:
        # Typed all along in the process that created it; decoded only after a handover.
        value = saga.value if saga.value is not None else definition.decode(saga.input)
        results = definition.decode_results(saga.data)
        deadline = time.monotonic() + self.policy.forward_deadline
        done: StepDone | None = None  # the step that just succeeded, written with what follows
        for position, step in enumerate(definition.steps):
            if statuses.get((step.name, "forward")) == "succeeded":
                continue
            if position == 0 and not statuses:  # its first step, the first time: it starts
                self.metrics.started.labels(definition.name).inc()
            with step_span(definition.name, step.name, "forward") as span:
                await self._store.step_started(
                    saga.id,
                    self.owner,
                    step=step.name,
                    direction="forward",
                    position=position,
                    done=done,
                    traceparent=saga.traceparent,
                )
                call = StepCall(saga.id, step.name, f"{saga.id}:{step.name}", value, results)
                timer = _StepTimer(self.metrics, definition.name, step.name, "forward", span)
                try:
                    if definition.is_retried_forward(position):
                        result = await self._until_it_succeeds(definition.name, call, step)
                    else:
                        result = await self._attempts(definition.name, call, step, deadline)
                except (StepFailed, GaveUp) as failure:
                    outcome = "rejected" if isinstance(failure, StepFailed) else "failed"
                    timer.done(outcome, str(failure))
                    await self._stop_forward(saga.id, step.name, failure)
                    return replace(saga, status="compensating")
                timer.done("succeeded")
            stored = definition.encode_result(step, result)
            if stored:
                results = results.added(step.name, result)
            done = StepDone(step.name, stored)
        await self._finish(definition, saga.id, "completed", None, results, done=done)
        self.metrics.finished.labels(definition.name, "completed", "").inc()
        return replace(saga, status="completed")

    async def _stop_forward(
        self, saga_id: uuid.UUID, step: str, failure: StepFailed | GaveUp
    ) -> None:
        """The step was refused (rejected) or kept failing (failed): compensate from here."""
        if isinstance(failure, StepFailed):
            status, reason = "rejected", f"{failure.reason}: {failure.detail}"
        else:
            status, reason = "failed", f"{step} failed: {failure}"
        await self._end_step(saga_id, step, "forward", status)
        await self._set_status(saga_id, "compensating", reason)

    async def _attempts(
        self, saga: str, call: StepCall[Any], step: Step[Any], deadline: float
    ) -> Any:
        """Retry faults with jittered backoff until the deadline (at least one attempt)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with own_deadline(step.timeout):
                    async with asyncio.timeout(step.timeout):
                        result = await step.action(call)
            except StepFailed as failure:
                await self._attempt(saga, call.saga_id, step.name, "forward", str(failure), attempt)
                raise
            except Exception as exc:
                error = _describe(exc)
                await self._attempt(saga, call.saga_id, step.name, "forward", error, attempt)
                pause = random.uniform(0, min(self.policy.retry_backoff_max, 0.05 * 2**attempt))
                if time.monotonic() + pause >= deadline:
                    raise GaveUp(error) from exc
                self._retrying(saga, step.name, "forward")
                await asyncio.sleep(pause)
                continue
            return result

    async def _until_it_succeeds(self, saga: str, call: StepCall[Any], step: Step[Any]) -> Any:
        """A step after the pivot: past the point of no return there is nothing to go back
        to, so faults and refusals alike are retried (same key, backing off) until it goes
        through; each attempt shows in the step log, and a long run of them is logged as an
        alert for an operator. Only losing the saga to another owner stops it."""
        stuck = self.metrics.stuck.labels(saga, step.name)
        alerted = False
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    with own_deadline(step.timeout):
                        async with asyncio.timeout(step.timeout):
                            return await step.action(call)
                except Exception as exc:
                    error = _describe(exc)
                    await self._attempt(saga, call.saga_id, step.name, "forward", error, attempt)
                    self._retrying(saga, step.name, "forward")  # whatever it was: again
                    if attempt % self.policy.alert_after_attempts == 0:
                        stuck.inc(0 if alerted else 1)
                        alerted = True
                        log.error(
                            "saga.stuck_after_pivot",
                            saga_id=str(call.saga_id),
                            step=step.name,
                            attempts=attempt,
                            error=error,
                        )
                cap = self.policy.forward_backoff_max
                await asyncio.sleep(random.uniform(0, min(cap, 0.05 * 2 ** min(attempt, 10))))
        finally:  # succeeded, taken over or shut down: no longer stuck here
            if alerted:
                stuck.dec()

    # -- compensation ----------------------------------------------------------------------

    async def _shielded_compensation(self, definition: SagaDefinition[Any], saga: SagaRow) -> None:
        # A shutdown (cancellation of the saga task) must not cut an undo in half.
        task = asyncio.create_task(
            self._compensate(definition, saga), name=f"undo-{saga.id}", context=without_deadline()
        )
        self._compensations.add(task)
        task.add_done_callback(self._compensations.discard)
        await asyncio.shield(task)

    async def _compensate(self, definition: SagaDefinition[Any], saga: SagaRow) -> None:
        current = await self._store.load(saga.id)
        assert current is not None
        value = definition.decode(current.input)
        results = definition.decode_results(current.data)
        statuses = await self._statuses(saga.id)
        registered = definition.steps[: current.started_steps]
        for position in reversed(range(len(registered))):
            step = registered[position]
            if not _needs_undo(step, statuses):
                continue
            undo = _Undo(definition.name, saga.id, step, position, saga.traceparent)
            refusal = await self._undo_step(undo, value, results)
            if refusal is not None:
                reason = f"compensation of {step.name} kept failing; retry via the operator API"
                await self._finish(
                    definition,
                    saga.id,
                    "compensation_failed",
                    reason,
                    results,
                    first_reason=current.failure_reason,
                )
                self._count_end(definition, "compensation_failed", statuses)
                self.metrics.count_parked(definition.name, step.name, refusal)
                return
        await self._finish(
            definition, saga.id, "cancelled", None, results, first_reason=current.failure_reason
        )
        self._count_end(definition, "cancelled", statuses)

    def _count_end(
        self, definition: SagaDefinition[Any], status: str, statuses: dict[tuple[str, str], str]
    ) -> None:
        # The deciding step: the forward step that was refused or gave up.
        decided_by = next(
            (s.name for s in definition.steps if statuses.get((s.name, "forward")) in _STOPPED),
            "",
        )
        self.metrics.finished.labels(definition.name, status, decided_by).inc()

    async def _undo_step(self, undo: _Undo, value: Any, results: StepResults) -> str | None:
        """Run one compensation until it goes through (None), or until it was refused too
        often: then the refusal's reason code, and the saga is to be parked."""
        with step_span(undo.saga, undo.step.name, "compensate") as span:
            await self._store.step_started(
                undo.saga_id,
                self.owner,
                step=undo.step.name,
                direction="compensate",
                position=undo.position,
                traceparent=undo.traceparent,
            )
            timer = _StepTimer(self.metrics, undo.saga, undo.step.name, "compensate", span)
            refusal = await self._undo_attempts(undo, value, results)
            if refusal is None:
                await self._succeeded(undo.saga_id, undo.step.name, "compensate", {})
                timer.done("succeeded")
                return None
            await self._end_step(undo.saga_id, undo.step.name, "compensate", "failed")
            timer.done("failed", f"refused {self.policy.compensation_attempts} times: {refusal}")
            return refusal.reason

    async def _undo_attempts(
        self, undo: _Undo, value: Any, results: StepResults
    ) -> StepFailed | None:
        """None once the undo went through; else the last of too many refusals."""
        step, saga_id = undo.step, undo.saga_id
        assert step.compensation is not None
        call = StepCall(saga_id, step.name, f"{saga_id}:{step.name}:undo", value, results)
        # A fault (participant down, timeout, open breaker) is retried until the undo goes
        # through: parking on one would leave stock held or money kept for an outage that
        # heals. Only a participant's refusal, repeated, parks the saga for an operator.
        attempt = refusals = 0
        while True:
            attempt += 1
            try:  # a fresh budget per attempt, whatever time the forward path used up
                with own_deadline(step.timeout):
                    async with asyncio.timeout(step.timeout):
                        await step.compensation(call)
                return None
            except Exception as exc:
                error = _describe(exc)
                await self._attempt(undo.saga, saga_id, step.name, "compensate", error, attempt)
                refusals += isinstance(exc, StepFailed)
                if isinstance(exc, StepFailed) and refusals >= self.policy.compensation_attempts:
                    return exc
            self._retrying(undo.saga, step.name, "compensate")
            cap = self.policy.compensation_backoff_max
            await asyncio.sleep(random.uniform(0, min(cap, 0.1 * 2 ** min(attempt, 10))))

    # -- persistence helpers ---------------------------------------------------------------

    async def _finish(
        self,
        definition: SagaDefinition[Any],
        saga_id: uuid.UUID,
        status: str,
        reason: str | None,
        results: StepResults,
        *,
        done: StepDone | None = None,
        first_reason: str | None = None,
    ) -> None:
        """End the saga with what its service writes with the end (``on_finish``), in one
        statement. ``first_reason``: the failure that started the compensation, if any (this
        process owns the saga, so nobody else can have changed it)."""
        outcome = SagaOutcome(saga_id, status, first_reason or reason, results)
        writes = definition.on_finish(outcome) if definition.on_finish is not None else None
        first = await self._store.finish(
            saga_id, self.owner, status=status, reason=reason, done=done, writes=writes
        )
        log.info("saga.finished", saga_id=str(saga_id), status=status, reason=first)

    async def _set_status(self, saga_id: uuid.UUID, status: str, reason: str) -> None:
        await self._store.set_status(saga_id, self.owner, status, reason)

    async def _attempt(
        self, saga: str, saga_id: uuid.UUID, step: str, direction: str, error: str, attempt: int
    ) -> None:
        """A failed attempt: counted, an event of the step's span, written to the step log."""
        self.metrics.failed_attempts.labels(saga, step, direction).inc()
        attempt_failed(attempt, error)
        await self._store.attempt_made(
            saga_id, self.owner, step=step, direction=direction, error=error
        )

    def _retrying(self, saga: str, step: str, direction: str) -> None:
        """Another attempt of the step follows a failed one."""
        self.metrics.retries.labels(saga, step, direction).inc()

    async def _succeeded(
        self, saga_id: uuid.UUID, step: str, direction: str, data: dict[str, Any]
    ) -> None:
        await self._store.step_succeeded(
            saga_id, self.owner, step=step, direction=direction, data=data
        )

    async def _end_step(self, saga_id: uuid.UUID, step: str, direction: str, status: str) -> None:
        await self._store.step_finished(
            saga_id, self.owner, step=step, direction=direction, status=status
        )

    async def _statuses(self, saga_id: uuid.UUID) -> dict[tuple[str, str], str]:
        return await self._store.statuses(saga_id)

    # -- background loops ------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.policy.lease_ttl / 3)
            await _quietly("saga.heartbeat_failed", self._renew())

    async def _renew(self) -> None:
        await self._store.renew_leases(self.owner, self.policy.lease_ttl)

    async def _recover(self) -> None:
        while True:
            await _quietly("saga.recovery_failed", self._claim_and_launch())
            await asyncio.sleep(self.policy.lease_ttl / 2)

    async def _claim_and_launch(self) -> None:
        claimed = await self._store.claim_orphans(
            self.owner, instance=self.instance, ttl=self.policy.lease_ttl
        )
        # A saga whose task died here (say Postgres went away mid-step) keeps this
        # process's lease alive through the heartbeat: nobody else would ever take it.
        stranded = [
            saga_id
            for saga_id in await self._store.own_unfinished(self.owner)
            if saga_id not in self._running and saga_id not in claimed
        ]
        for saga_id in claimed:
            log.info("saga.recovered", saga_id=str(saga_id))
            self.metrics.recovered.inc()
            self.launch(saga_id)
        for saga_id in stranded:
            log.info("saga.resumed", saga_id=str(saga_id))
            self.launch(saga_id)


_STOPPED = ("rejected", "failed")


class _StepTimer:
    """Times one step from its first attempt to its end, and gives its span the outcome."""

    def __init__(
        self, metrics: SagaMetrics, saga: str, step: str, direction: str, span: Span
    ) -> None:
        self._histogram = metrics.step_seconds
        self._labels = (saga, step, direction)
        self._span = span
        self._started = time.monotonic()

    def done(self, outcome: str, error: str | None = None) -> None:
        elapsed = time.monotonic() - self._started
        self._histogram.labels(*self._labels, outcome).observe(elapsed)
        step_outcome(self._span, outcome, error)


@dataclass(frozen=True, slots=True)
class _Undo:
    """One compensation to run: which saga, which step, and the saga's trace."""

    saga: str
    saga_id: uuid.UUID
    step: Step[Any]
    position: int
    traceparent: str | None


@dataclass(frozen=True, slots=True)
class PreparedSaga:
    """A saga to insert in the caller's statement (see :meth:`SagaEngine.prepare`)."""

    row: SagaRow
    owner: str
    ttl: float

    def ctes(self, after: str, first: int) -> tuple[str, list[Any]]:
        """The CTE ``saga``, written when ``after`` returned a row, and its parameters."""
        row = self.row
        return insert_saga_cte(
            row.id,
            row.name,
            row.input,
            owner=self.owner,
            ttl=self.ttl,
            traceparent=row.traceparent,
            after=after,
            first=first,
        )


def _needs_undo(step: Step[Any], statuses: dict[tuple[str, str], str]) -> bool:
    # A step the participant rejected did nothing; one already undone needs nothing more.
    forward = statuses.get((step.name, "forward"))
    return (
        step.compensation is not None
        and forward not in (None, "rejected")
        and statuses.get((step.name, "compensate")) != "succeeded"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _quietly(event: str, work: Any) -> None:
    try:
        await work
    except Exception as exc:
        if not is_transient(exc):
            raise  # a bug: the supervisor logs it and restarts the loop
        # The database may be restarting; the loop tries again on its next tick.
        log.warning(event, error=_describe(exc))
