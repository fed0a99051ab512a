"""A toy saga for the engine's tests: a trip (flight -> hotel -> car) whose participants log
what they were asked and fail as a test scripts them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from typing import Any

from ordermesh_shared.saga import SagaDefinition, SagaOutcome, SagaPolicy, Step, StepCall

PRICE = Decimal("12.50")

FAST = SagaPolicy(
    forward_deadline=1.0,
    retry_backoff_max=0.05,
    compensation_attempts=3,
    compensation_backoff_max=0.01,
    lease_ttl=0.6,
    shutdown_grace=1.0,
)


@dataclass(frozen=True, slots=True)
class Booked:
    """What each step of the trip returns (typed, with money as Decimal)."""

    what: str
    city: str
    price: Decimal


@dataclass(frozen=True)
class Trip:
    city: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Trip:
        return cls(**data)


class World:
    """Participants that log what they were asked to do, with scripted failures."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.keys: list[str] = []
        self.failures: dict[str, list[Exception]] = {}
        self.hang: set[str] = set()
        self.outcomes: list[SagaOutcome] = []
        self.seen: dict[str, dict[str, object]] = {}  # step -> earlier results it was given

    def step(self, name: str) -> Step[Trip]:
        async def action(call: StepCall[Trip]) -> Booked:
            self.seen[name] = call.results.by_step()
            await self._do(name, call)
            return Booked(name, call.input.city, PRICE)

        async def undo(call: StepCall[Trip]) -> None:
            await self._do(f"undo-{name}", call)

        return Step(name, action, undo, timeout=0.3, result=Booked)

    async def _do(self, name: str, call: StepCall[Trip]) -> None:
        self.calls.append(name)
        self.keys.append(call.key)
        if name in self.hang:
            await asyncio.sleep(3600)
        queued = self.failures.get(name)
        if queued:
            raise queued.pop(0)

    def definition(self) -> SagaDefinition[Trip]:
        def record(outcome: SagaOutcome) -> None:
            self.outcomes.append(outcome)  # nothing of its own to write with the end

        return SagaDefinition(
            "trip",
            steps=(self.step("flight"), self.step("hotel"), self.step("car")),
            encode=asdict,
            decode=Trip.from_json,
            on_finish=record,
        )

    def with_pivot(self, pivot: str = "hotel") -> SagaDefinition[Trip]:
        """flight -> hotel (the pivot) -> car, which comes after it and so has no undo."""
        plain = self.definition()
        car = replace(self.step("car"), compensation=None)
        return replace(plain, steps=(*plain.steps[:2], car), pivot=pivot)
