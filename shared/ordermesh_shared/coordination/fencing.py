"""Fenced writes in Postgres: a resource refuses writes from a replaced lock holder or leader.

A lease is wall-clock time: a holder frozen past its TTL (GC pause, VM stall, SIGSTOP) wakes
up still believing it holds the lock. Each write therefore carries the holder's fencing
token, and :func:`fence` — in the same transaction as the write — records the highest token
the resource has seen and refuses older ones.

    async with conn.transaction():
        await fence(conn, resource="outbox-relay", token=term.token)  # StaleToken if replaced
        await mark_published(conn, ids)

Use one lock or election name per resource (tokens of different names are not comparable).
Tokens only ever grow, unless an operator re-bases a fence with :func:`rebase_fence` after
etcd lost its data (its revisions start again at 1, below every token Postgres has seen).
:func:`fence` locks the resource's row until the transaction ends, serialising all fenced
writers of that resource: keep fenced transactions short, and set
``idle_in_transaction_session_timeout`` so a frozen writer cannot hold the row for long.
"""

from __future__ import annotations

from dataclasses import dataclass

from ordermesh_shared.coordination.errors import StaleToken
from ordermesh_shared.database import DbConn

# The WHERE makes a stale token update nothing; either way the row stays locked by us
# until commit, so no concurrent writer can slip in between this check and our write.
_ADVANCE = """
INSERT INTO fencing_tokens AS f (resource, token) VALUES ($1, $2)
ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token, updated_at = now()
    WHERE f.token <= EXCLUDED.token
RETURNING token
"""
_CURRENT = "SELECT token FROM fencing_tokens WHERE resource = $1"
# FOR UPDATE: fenced writers wait until the re-base commits, then see the new token.
_RECORD = """
SELECT token, extract(epoch FROM now() - updated_at)::float8 AS idle
FROM fencing_tokens WHERE resource = $1 FOR UPDATE
"""
_REBASE = """
UPDATE fencing_tokens SET token = $2, updated_at = now()
WHERE resource = $1 AND token = $3
"""


@dataclass(frozen=True, slots=True)
class FenceRecord:
    """A resource's fence: the highest token accepted, and seconds since a write carrying it
    was last accepted (an accepted write with an equal token refreshes that time)."""

    token: int
    idle_seconds: float


async def fence(conn: DbConn, *, resource: str, token: int) -> None:
    """Accept ``token`` for ``resource`` or raise :class:`StaleToken`; call inside the write's
    transaction, before the write.

    A token equal to the highest seen is accepted (the same holder writes many times); a
    higher one becomes the new highest. Rolling back the transaction undoes the record too.
    """
    _check(resource, token)
    if not conn.is_in_transaction():
        raise RuntimeError(
            "fence() must run inside the transaction of the write it protects "
            "(async with conn.transaction(): ...), or the check and the write are not atomic"
        )
    if await conn.fetchval(_ADVANCE, resource, token) is None:
        current = await conn.fetchval(_CURRENT, resource)  # row locked: this is the latest
        raise StaleToken(resource, token, int(current))


async def current_token(conn: DbConn, *, resource: str) -> int | None:
    """The highest token ``resource`` has accepted, or None if it has never been fenced."""
    value = await conn.fetchval(_CURRENT, resource)
    return None if value is None else int(value)


async def fence_record(conn: DbConn, *, resource: str) -> FenceRecord | None:
    """The resource's fence, its row locked until the transaction ends (None: never fenced)."""
    row = await conn.fetchrow(_RECORD, resource)
    return None if row is None else FenceRecord(int(row["token"]), float(row["idle"]))


async def rebase_fence(conn: DbConn, *, resource: str, token: int, expected: int) -> bool:
    """Set the fence of ``resource`` to ``token`` (usually lower) if it is still ``expected``.

    Only for an operator's repair after etcd lost its data: every holder of a token above
    ``token`` is let in again, so the caller must have made sure none is alive. False when
    the stored token is no longer ``expected`` (nothing changed).
    """
    _check(resource, token)
    return str(await conn.execute(_REBASE, resource, token, expected)) == "UPDATE 1"


def _check(resource: str, token: int) -> None:
    if not isinstance(resource, str) or not resource.strip():
        raise ValueError(f"resource must be a non-empty string, got {resource!r}")
    # etcd revisions start at 1; a 0 usually means a token field etcd left out (zero = absent).
    if isinstance(token, bool) or not isinstance(token, int) or token < 1:
        raise ValueError(f"token must be a positive int (an etcd revision), got {token!r}")
