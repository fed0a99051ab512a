"""Orchestrated sagas persisted in Postgres: steps, compensations, crash recovery."""

from pathlib import Path

from ordermesh_shared.database import MigrationSet
from ordermesh_shared.saga.definition import (
    FinishWrites,
    SagaDefinition,
    SagaOutcome,
    SagaPolicy,
    Step,
    StepCall,
    StepFailed,
    StepResults,
)
from ordermesh_shared.saga.engine import SagaEngine
from ordermesh_shared.saga.metrics import SagaMetrics

SAGA_MIGRATIONS = MigrationSet("saga", Path(__file__).resolve().parent / "migrations")

__all__ = [
    "SAGA_MIGRATIONS",
    "FinishWrites",
    "SagaDefinition",
    "SagaEngine",
    "SagaMetrics",
    "SagaOutcome",
    "SagaPolicy",
    "Step",
    "StepCall",
    "StepFailed",
    "StepResults",
]
