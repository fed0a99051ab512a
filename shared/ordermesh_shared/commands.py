"""Idempotent participant commands in two round trips: load, decide, write once.

A participant's state-changing endpoint runs a :class:`Command`:

1. ``load``: one query reads the answer stored under the caller's key (if any) together
   with the aggregate the command acts on;
2. ``decide``: plain Python, no I/O: the domain says what happens, or refuses (a
   ``ServiceError``: the refusal is the answer);
3. ``save``: one statement writes the effect, its outbox event and the answer together,
   checking that the aggregate is still as loaded.

No lock is held between the two round trips. A command that lost a race (another command
changed the aggregate, or stored an answer under the same key, after the load) fails its
statement as a whole, nothing written, and :func:`run_command` runs it again from the load,
which then sees the winner's work: the stored answer (a replay) or the new state to decide on.
The statement signals a lost race with ``command_raced()`` (SQLSTATE 40001, like a
serialization failure); a unique key that is already taken, a deadlock or a serialization
failure are retried the same way.

>>> @router.post("/reservations", status_code=201)
... async def reserve(body: ReserveRequest, ctx: Ctx, key: IdempotencyKey, request: Request):
...     return await run_command(ctx.db, key, fingerprint(request, body), ReserveStock(body))
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
import orjson
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import Request

from ordermesh_shared.database import Database, DbConn
from ordermesh_shared.errors import ServiceError, Unavailable
from ordermesh_shared.idempotency import CallerKey, KeyReused
from ordermesh_shared.messaging.topology import check_word
from ordermesh_shared.outbox.store import event_ctes
from ordermesh_shared.relay_bell import RelayBell

StateT = TypeVar("StateT")
StateT_co = TypeVar("StateT_co", covariant=True)
ChangeT = TypeVar("ChangeT")

# Lost races in a row before giving up (503: each one means another command made progress).
MAX_ATTEMPTS = 5

# Columns and FROM clause that read the answer stored under key $1, for a command's load
# query to select beside its aggregate: ``SELECT {ANSWER_COLUMNS}, ... FROM {ANSWER_FROM} ...``.
ANSWER_COLUMNS = (
    "k.request_hash AS answer_hash, k.status_code AS answer_status, k.response AS answer_body"
)
ANSWER_FROM = "(SELECT 1) AS one LEFT JOIN idempotency_keys k ON k.key = $1"


class CommandRaced(Unavailable):
    """A command kept losing races to others past :data:`MAX_ATTEMPTS` (503: retry later)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the caller gets, stored with the effect: a replay gets the same.

    ``encoded``: the body as JSON, made once (by orjson) for both the stored row and the
    HTTP answer; a stored answer keeps the text it was loaded as."""

    status: int
    body: Any
    encoded: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.encoded:
            object.__setattr__(self, "encoded", orjson.dumps(self.body))

    def response(self, *, replay: bool) -> JSONResponse:
        """The HTTP answer (``Idempotent-Replay`` says whether it was stored before)."""
        headers = {"Idempotent-Replay": "true" if replay else "false"}
        return _EncodedJSON(self.encoded, status_code=self.status, headers=headers)


class _EncodedJSON(JSONResponse):
    """A JSON response whose body is JSON already (no second encoding)."""

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else super().render(content)


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """An answer as the load query found it under the key, with its request's fingerprint."""

    fingerprint: str
    answer: Answer


@dataclass(frozen=True, slots=True)
class Event:
    """A domain event a decision causes; written to the outbox by the decision's statement."""

    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: Mapping[str, Any]
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def __post_init__(self) -> None:
        check_word(self.event_type, what="event type")


@dataclass(frozen=True, slots=True)
class Loaded(Generic[StateT_co]):
    """What a command's load query read: the stored answer, if any, and the aggregate."""

    stored: StoredAnswer | None
    state: StateT_co


@dataclass(frozen=True, slots=True)
class Decision(Generic[ChangeT]):
    """What a command decided: its answer and, when something changes, the change (what the
    command's ``save`` writes) and the event it causes. Without a change only the answer is
    stored, as for a refusal or a repeated undo of something already undone.
    """

    answer: Answer
    change: ChangeT | None = None
    event: Event | None = None


class Command(Protocol[StateT, ChangeT]):
    """A use case of a participant: load, decide (no I/O), save (one statement)."""

    async def load(self, conn: DbConn, key: str) -> Loaded[StateT]:
        """Read the answer under ``key`` ($1, via :data:`ANSWER_FROM`) and the aggregate."""
        ...

    def decide(self, state: StateT) -> Decision[ChangeT]:
        """The domain's decision; raise a ``ServiceError`` to refuse (the refusal is stored)."""
        ...

    async def save(self, conn: DbConn, change: ChangeT, recorded: Recorded) -> None:
        """Write ``change`` in one statement that includes ``recorded.ctes`` and selects
        ``recorded.check``; call ``command_raced()`` in SQL when the aggregate is no longer as
        loaded."""
        ...


@dataclass(frozen=True, slots=True)
class Recorded:
    """The outbox event and the answer a command's statement writes with its effect.

    ``ctes(after, first)`` gives the CTEs (``event``, ``woken``, ``answer``) that write them
    when the CTE named ``after`` returned a row, with their parameters numbered from
    ``first``; ``args`` are those parameters; ``check`` is a SQL expression to select last
    (it references the CTEs, so that Postgres runs them).
    """

    key: str
    fingerprint: str
    answer: Answer
    event: Event | None
    notify: bool = True  # False: the relay here leads; the writer rings Database.bell instead
    # The event's payload as JSON values, made once: both ctes() and args need it.
    _payload: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        payload = jsonable_encoder(self.event.payload) if self.event is not None else None
        object.__setattr__(self, "_payload", payload)

    def ctes(self, after: str, first: int) -> str:
        """The CTEs, as ``name AS (...)`` joined by commas (no leading WITH or comma)."""
        n = first
        answer = (
            "answer AS (INSERT INTO idempotency_keys (key, request_hash, status_code, response)"
            f" SELECT ${n}, ${n + 1}, ${n + 2}, ${n + 3}::jsonb FROM {after} LIMIT 1 RETURNING 1)"
        )
        if self.event is None:
            return answer
        event, _ = self._event(after, first + 4)
        return f"{answer}, {event}"

    def _event(self, after: str, first: int) -> tuple[str, list[Any]]:
        assert self.event is not None
        event = self.event
        return event_ctes(
            event.event_id,
            event.aggregate_type,
            event.aggregate_id,
            event.event_type,
            self._payload,
            after=after,
            first=first,
            notify=self.notify,
        )

    @property
    def check(self) -> str:
        """Counts what the CTEs wrote (selecting it makes the ``woken`` CTE run)."""
        woken = " + (SELECT count(*) FROM woken)" if self.event is not None else ""
        return f"(SELECT count(*) FROM answer){woken}"

    @property
    def args(self) -> list[Any]:
        """The parameters of :meth:`ctes`, in order."""
        body = self.answer.encoded.decode()
        values: list[Any] = [self.key, self.fingerprint, self.answer.status, body]
        if self.event is not None:
            values += self._event("", 0)[1]
        return values


def fingerprint(request: Request, body: BaseModel | None = None) -> str:
    """The one fingerprint rule: method, path and canonical body. A key reused with another
    request gets 422 instead of the first request's answer."""
    canonical = {
        "method": request.method,
        "path": request.url.path,
        "body": body.model_dump(mode="json") if body is not None else None,
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def stored_answer(row: asyncpg.Record) -> StoredAnswer | None:
    """The answer columns of a load query (:data:`ANSWER_COLUMNS`), or None."""
    if row["answer_hash"] is None:
        return None
    text: str = row["answer_body"]
    answer = Answer(row["answer_status"], orjson.loads(text), encoded=text.encode())
    return StoredAnswer(row["answer_hash"], answer)


async def run_command(
    db: Database, key: CallerKey, fingerprint: str, command: Command[Any, Any]
) -> JSONResponse:
    """Run ``command`` once per caller and key: the first call's answer, success or refusal,
    is stored with its effect; every later call with the key gets it back."""
    async with db.pool.acquire() as conn:
        for _ in range(MAX_ATTEMPTS):
            try:
                return await _attempt(conn, db.bell, key, fingerprint, command)
            except (asyncpg.TransactionRollbackError, asyncpg.UniqueViolationError):
                continue  # lost a race: the next load sees the winner's work
    raise CommandRaced(
        f"the command kept meeting concurrent changes ({MAX_ATTEMPTS} tries); retry later"
    )


async def _attempt(
    conn: DbConn, bell: RelayBell, key: CallerKey, fingerprint: str, command: Command[Any, Any]
) -> JSONResponse:
    loaded = await command.load(conn, key.stored)
    if loaded.stored is not None:
        if loaded.stored.fingerprint != fingerprint:
            raise KeyReused(
                f"Idempotency-Key {key.key!r} was already used with a different request"
            )
        return loaded.stored.answer.response(replay=True)
    try:
        decision = command.decide(loaded.state)
    except ServiceError as refusal:  # a business "no" is an answer too, stored as one
        decision = Decision(Answer(refusal.status_code, jsonable_encoder(refusal.body())))
    notify = bell.notify_others
    recorded = Recorded(key.stored, fingerprint, decision.answer, decision.event, notify)
    if decision.change is not None:
        await command.save(conn, decision.change, recorded)  # one statement: committed
        if decision.event is not None:
            bell.ring()
    else:
        await _answer_only(conn, recorded)
    return decision.answer.response(replay=False)


async def _answer_only(conn: DbConn, recorded: Recorded) -> None:
    # A plain INSERT: a concurrent call that stored its answer first makes this one fail
    # (unique violation), and the retry replays that answer.
    await conn.execute(
        f"WITH once AS (SELECT 1), {recorded.ctes('once', 1)} SELECT {recorded.check}",
        *recorded.args,
    )
