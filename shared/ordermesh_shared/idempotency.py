"""Idempotent commands: the key and the answer are stored in the same transaction as the effect.

A participant's state-changing endpoint runs its effect through :func:`run_once`. The first
call with a key performs the effect and stores the answer (success or business rejection);
every later call with that key gets the stored answer without touching anything. Concurrent
calls with one key are serialised by a transaction-scoped advisory lock, so exactly one runs.

>>> @router.post("/payments")
... async def charge(body: ChargeRequest, ctx: Ctx, key: IdempotencyKey) -> JSONResponse:
...     return await run_once(ctx.db.pool, key, body, lambda conn: charge_customer(conn, body))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import asyncpg
from fastapi import Header
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import ServiceError

IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Makes the command safe to retry: a replay returns the first answer.",
        examples=["6f1c2a7e-3b0d-4a59-9a43-0c8f6c9a1d2e:reserve"],
    ),
]

Effect = Callable[[DbConn], Awaitable[tuple[int, Any]]]


class KeyReused(ServiceError):
    """The key was used before with a different request (422)."""

    status_code = 422


def request_hash(body: BaseModel, *, path: str) -> str:
    """A fingerprint of the command, to tell a replay from a reused key."""
    canonical = json.dumps({"path": path, "body": body.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def run_once(
    pool: asyncpg.Pool, key: str, *, fingerprint: str, effect: Effect
) -> JSONResponse:
    """Run ``effect`` once per key; a business rejection (ServiceError) is stored like a success."""
    async with pool.acquire() as conn, conn.transaction():
        stored = await _lock_and_load(conn, key, fingerprint)
        if stored is not None:
            return stored
        status, body = await _attempt(conn, effect)
        await _remember(conn, key, fingerprint, status, body)
    return JSONResponse(body, status_code=status, headers={"Idempotent-Replay": "false"})


async def _lock_and_load(conn: DbConn, key: str, fingerprint: str) -> JSONResponse | None:
    # Serialises concurrent calls with this key until the first one commits its answer.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
    row = await conn.fetchrow(
        "SELECT request_hash, status_code, response FROM idempotency_keys WHERE key = $1", key
    )
    if row is None:
        return None
    if row["request_hash"] != fingerprint:
        raise KeyReused(f"Idempotency-Key {key!r} was already used with a different request")
    body = json.loads(row["response"])
    return JSONResponse(body, status_code=row["status_code"], headers={"Idempotent-Replay": "true"})


async def _attempt(conn: DbConn, effect: Effect) -> tuple[int, Any]:
    try:
        # A savepoint: a rejected command leaves no partial effect, yet its answer is stored.
        async with conn.transaction():
            status, body = await effect(conn)
    except ServiceError as exc:
        return exc.status_code, exc.body()
    return status, jsonable_encoder(body)


async def _remember(conn: DbConn, key: str, fingerprint: str, status: int, body: Any) -> None:
    await conn.execute(
        "INSERT INTO idempotency_keys (key, request_hash, status_code, response)"
        " VALUES ($1, $2, $3, $4)",
        key,
        fingerprint,
        status,
        json.dumps(body),
    )
