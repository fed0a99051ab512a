"""What a saga is: ordered steps, each an action and the compensation that undoes it."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pydantic import TypeAdapter

InputT = TypeVar("InputT")
ResultT = TypeVar("ResultT")

SagaStatus = str  # running | compensating | completed | cancelled | compensation_failed
TERMINAL = ("completed", "cancelled", "compensation_failed")


class StepFailed(Exception):
    """A business "no" from a step: nothing happened, so compensate what came before.

    Raise it from an action (never for faults: any other exception is treated as a fault
    and the step is retried with the same idempotency key until the saga's deadline).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StepResults:
    """What the steps that succeeded so far returned, as the typed values they returned.

    >>> reserved = call.results.get(Reserved)    # the one result of that type, or LookupError
    >>> call.results.find(Shipped)               # or None while no step has returned one
    """

    __slots__ = ("_by_step",)

    def __init__(self, by_step: Mapping[str, object] | None = None) -> None:
        self._by_step = dict(by_step or {})

    def get(self, kind: type[ResultT]) -> ResultT:
        """The result of type ``kind``; LookupError when no step (or more than one) gave one."""
        found = self.find(kind)
        if found is None:
            raise LookupError(f"no step has returned a {kind.__name__} (yet)")
        return found

    def find(self, kind: type[ResultT]) -> ResultT | None:
        """The result of type ``kind``, or None."""
        found = [value for value in self._by_step.values() if isinstance(value, kind)]
        if len(found) > 1:
            raise LookupError(f"{len(found)} steps returned a {kind.__name__}: look up by step")
        return found[0] if found else None

    def __getitem__(self, step: str) -> object:
        return self._by_step[step]

    def by_step(self) -> dict[str, object]:
        """Step name -> result, for every step that returned one."""
        return dict(self._by_step)

    def added(self, step: str, value: object) -> StepResults:
        """These results and ``step``'s."""
        return StepResults({**self._by_step, step: value})


@dataclass(frozen=True, slots=True)
class StepCall(Generic[InputT]):
    """What an action or compensation gets: one frozen input plus earlier steps' results."""

    saga_id: uuid.UUID
    step: str
    key: str  # the idempotency key: "<saga_id>:<step>" (compensations add ":undo")
    input: InputT
    results: StepResults


Action = Callable[[StepCall[InputT]], Awaitable[object]]
Compensation = Callable[[StepCall[InputT]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Step(Generic[InputT]):
    """One step; its compensation is registered (persisted) before its action runs.

    ``result``: the type the action returns (a frozen dataclass, say), kept typed in the
    process and stored as JSON between processes; None when the action returns nothing
    worth keeping.
    """

    name: str
    action: Action[InputT]
    compensation: Compensation[InputT] | None = None
    timeout: float = 5.0
    result: type[Any] | None = None


class FinishWrites(Protocol):
    """What a service writes with its saga's end, in the one statement that ends it: CTEs
    written only when the CTE named ``after`` returned a row (it has an ``id`` column: the
    saga's id), so that nothing is written when the saga is no longer this process's."""

    def ctes(self, after: str, first: int) -> tuple[str, list[Any]]:
        """``name AS (...)`` entries joined by commas, and their parameters (numbered from
        ``first``)."""
        ...

    @property
    def select(self) -> str:
        """A SQL expression selected at the end (Postgres runs a plain SELECT CTE, such as
        a NOTIFY, only when something selects from it)."""
        ...


@dataclass(frozen=True, slots=True)
class SagaOutcome:
    """How a saga ended, handed to ``on_finish`` for what to write with it."""

    saga_id: uuid.UUID
    status: SagaStatus
    reason: str | None
    results: StepResults


@dataclass(frozen=True)
class SagaDefinition(Generic[InputT]):
    """A named, ordered list of steps, with its point of no return.

    ``pivot`` names the step that decides the saga: up to and including it, a refusal or a
    fault past the forward deadline compensates what came before; once it has succeeded,
    the steps after it are retried forward until they succeed (they must not have a
    compensation: nothing after the pivot is ever undone). Without a pivot, every step is
    compensable.

    >>> definition = SagaDefinition("place_order", steps=(reserve, charge, ship, commit),
    ...                             encode=asdict, decode=PlaceOrder.from_json,
    ...                             on_finish=record_order_outcome, pivot="create_shipment")
    """

    name: str
    steps: tuple[Step[InputT], ...]
    encode: Callable[[InputT], Mapping[str, Any]]
    decode: Callable[[Mapping[str, Any]], InputT]
    # What the service writes with the saga's end (the order takes its outcome), in the same
    # statement; called once per end, before the statement runs.
    on_finish: Callable[[SagaOutcome], FinishWrites | None] | None = None
    pivot: str | None = None
    by_name: dict[str, Step[InputT]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"saga {self.name}: step names must be unique, got {names}")
        object.__setattr__(self, "by_name", {s.name: s for s in self.steps})
        if self.pivot is None:
            return
        if self.pivot not in names:
            raise ValueError(f"saga {self.name}: pivot {self.pivot!r} is not one of {names}")
        undone = [s.name for s in self.after_pivot() if s.compensation is not None]
        if undone:
            raise ValueError(
                f"saga {self.name}: {undone} come after the pivot {self.pivot!r}, so they are"
                " never compensated; drop their compensations or move the pivot"
            )

    def encode_result(self, step: Step[InputT], value: object) -> dict[str, Any]:
        """What the saga row keeps of ``step``'s result: ``{step name: JSON}``, or nothing."""
        if step.result is None:
            return {}
        if not isinstance(value, step.result):
            kind = type(value).__name__
            raise TypeError(f"step {step.name} returned a {kind}, not a {step.result.__name__}")
        return {step.name: _adapter(step.result).dump_python(value, mode="json")}

    def decode_results(self, stored: Mapping[str, Any]) -> StepResults:
        """The typed results back from what :meth:`encode_result` stored."""
        return StepResults(
            {
                step.name: _adapter(step.result).validate_python(stored[step.name])
                for step in self.steps
                if step.result is not None and step.name in stored
            }
        )

    def after_pivot(self) -> tuple[Step[InputT], ...]:
        """The steps retried forward until they succeed (none without a pivot)."""
        if self.pivot is None:
            return ()
        return self.steps[[s.name for s in self.steps].index(self.pivot) + 1 :]

    def is_retried_forward(self, position: int) -> bool:
        """Whether the step at ``position`` comes after the pivot."""
        return position >= len(self.steps) - len(self.after_pivot())


@dataclass(frozen=True, slots=True)
class SagaPolicy:
    """Timing of forward retries, compensation retries and ownership leases."""

    forward_deadline: float = 10.0  # seconds from the saga's start to keep retrying faults
    retry_backoff_max: float = 1.0
    # Steps after the pivot are retried until they succeed, backing off up to this.
    forward_backoff_max: float = 5.0
    # A step after the pivot failing this many times in a row is logged as an alert (and
    # again every as many attempts): it will not give up, so an operator should look.
    alert_after_attempts: int = 20
    # Refusals of an undo before the saga is parked as compensation_failed (faults are
    # retried until the undo goes through).
    compensation_attempts: int = 8
    compensation_backoff_max: float = 5.0
    lease_ttl: float = 5.0  # a crashed owner's sagas are taken over after this
    shutdown_grace: float = 5.0  # how long shutdown lets running compensations finish


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(kind: type[Any]) -> TypeAdapter[Any]:
    # Building an adapter costs far more than using one: one per result type, kept.
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter
