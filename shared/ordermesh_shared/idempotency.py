"""Idempotent commands: the key and the answer are stored in the same transaction as the effect.

A participant's state-changing endpoint runs its effect through :func:`run_once`. The first
call with a key performs the effect and stores the answer (success or business rejection);
every later call with that key gets the stored answer without touching anything. Concurrent
calls with one key are serialised by a transaction-scoped advisory lock, and the key's primary
key backs it up: exactly one call's effect commits, the others get its answer.

Keys live in the namespace of the authenticated caller (:data:`IdempotencyKey` requires a
service token): a key is stored as ``<caller>/<key>``, so no other caller can read the answer
stored under a key, or occupy in advance the key a compensation will use.

>>> @router.post("/payments")
... async def charge(body: ChargeRequest, ctx: Ctx, key: IdempotencyKey) -> JSONResponse:
...     return await run_once(
...         ctx.db.pool, key, fingerprint=request_hash(body, path="/payments"),
...         effect=lambda conn: charge_customer(conn, body),
...     )
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Header
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ordermesh_shared.auth import ServiceCaller
from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import ServiceError

KeyHeader = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Makes the command safe to retry: a replay returns the first answer.",
        examples=["6f1c2a7e-3b0d-4a59-9a43-0c8f6c9a1d2e:reserve"],
    ),
]


@dataclass(frozen=True, slots=True)
class CallerKey:
    """An ``Idempotency-Key`` as sent, in the namespace of the service that sent it."""

    caller: str
    key: str

    @property
    def stored(self) -> str:
        """The key as stored: ``<caller>/<key>`` (service names hold no ``/``)."""
        return f"{self.caller}/{self.key}"


async def caller_key(caller: ServiceCaller, key: KeyHeader) -> CallerKey:
    """FastAPI dependency: the authenticated caller (401/403 first) and its key."""
    return CallerKey(caller, key)


# A state-changing participant endpoint takes this: it is authenticated by the same token.
IdempotencyKey = Annotated[CallerKey, Depends(caller_key)]

Effect = Callable[[DbConn], Awaitable[tuple[int, Any]]]


class KeyReused(ServiceError):
    """The key was used before with a different request (422)."""

    status_code = 422


def request_hash(body: BaseModel, *, path: str) -> str:
    """A fingerprint of the command, to tell a replay from a reused key."""
    canonical = json.dumps({"path": path, "body": body.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def run_once(
    pool: asyncpg.Pool, key: CallerKey, *, fingerprint: str, effect: Effect
) -> JSONResponse:
    """Run ``effect`` once per caller and key; a business rejection (ServiceError) is stored
    like a success."""
    async with pool.acquire() as conn:
        try:
            return await _first_call(conn, key, fingerprint, effect)
        except _AnsweredMeanwhile:
            # A concurrent call with this key committed its answer after our first read
            # (see _lock_and_load); our effect was rolled back and that answer stands.
            async with conn.transaction():
                stored = await _lock_and_load(conn, key, fingerprint)
            if stored is None:  # stored and committed by the other call: cannot be gone
                missing = f"idempotency key {key.stored!r} conflicted but holds no answer"
                raise RuntimeError(missing) from None
            return stored


class _AnsweredMeanwhile(Exception):
    """The key's answer was stored by a concurrent call while this one ran."""


async def _first_call(
    conn: DbConn, key: CallerKey, fingerprint: str, effect: Effect
) -> JSONResponse:
    try:
        async with conn.transaction():
            stored = await _lock_and_load(conn, key, fingerprint)
            if stored is not None:
                return stored
            status, body = await effect(conn)
            body = jsonable_encoder(body)
            await _remember(conn, key, fingerprint, status, body)
    except KeyReused:
        raise
    except ServiceError as exc:
        # A business "no": the rollback undid any partial effect (cheaper than a savepoint
        # around every effect); the answer alone is stored, so a retry gets the same "no".
        status, body = exc.status_code, exc.body()
        async with conn.transaction():
            stored = await _lock_and_load(conn, key, fingerprint)
            if stored is not None:
                return stored
            await _remember(conn, key, fingerprint, status, body)
    return JSONResponse(body, status_code=status, headers={"Idempotent-Replay": "false"})


async def _lock_and_load(conn: DbConn, key: CallerKey, fingerprint: str) -> JSONResponse | None:
    # The advisory lock serialises concurrent calls with this key until the first one
    # commits, so the second one's effect sees the first one's. Taking it in the same
    # statement as the read saves a round trip, but the read then uses the snapshot from
    # before the wait: a key stored meanwhile shows up as a conflict in _remember instead.
    row = await conn.fetchrow(
        "SELECT k.request_hash, k.status_code, k.response"
        " FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 0))) AS locked"
        " LEFT JOIN idempotency_keys k ON k.key = $1",
        key.stored,
    )
    if row is None or row["request_hash"] is None:
        return None
    if row["request_hash"] != fingerprint:
        raise KeyReused(f"Idempotency-Key {key.key!r} was already used with a different request")
    body = json.loads(row["response"])
    return JSONResponse(body, status_code=row["status_code"], headers={"Idempotent-Replay": "true"})


async def _remember(conn: DbConn, key: CallerKey, fingerprint: str, status: int, body: Any) -> None:
    stored = await conn.fetchval(
        "INSERT INTO idempotency_keys (key, request_hash, status_code, response)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING RETURNING true",
        key.stored,
        fingerprint,
        status,
        json.dumps(body),
    )
    if not stored:
        raise _AnsweredMeanwhile(key)
