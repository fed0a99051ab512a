"""Coordination on etcd: distributed locks, leader election, and fenced writes in Postgres.

    lock = Lock(etcd, "/ordermesh/locks/reindex", ttl=5.0)
    async with lock.hold(timeout=10.0) as held, pool.acquire() as conn, conn.transaction():
        await fence(conn, resource="search-index", token=held.token)
        await reindex(conn)

    election = Election(etcd, "/ordermesh/elections/outbox-relay", ttl=5.0, value=instance_id)
    await election.run_while_leader(relay)  # relay(term) runs only while this instance leads

Both live on an etcd lease renewed every TTL/4; ``held.lost`` / ``term.lost`` is set when no
renewal was confirmed for 0.6 x TTL, before the lease can lapse. Leases are wall-clock
time, so they alone cannot stop a holder that froze and woke up: the fencing token (an etcd
revision, growing from holder to holder) checked by :func:`fence` where the writes land can.

Every failure leaves this package as one of these (never as an etcd or httpx exception)::

    CoordinationError            etcd refused a request, or answered something unexpected
    ├── CoordinationUnavailable  etcd unreachable or too slow (the message says what to check)
    ├── LockBusy                 try_hold(): the lock is held elsewhere
    │   └── LockTimeout          hold(timeout=...): still held elsewhere when the wait ran out
    ├── CampaignTimeout          lead(timeout=...): someone else still leads
    └── StaleToken               fence(): a newer holder has written; stop and acquire again

Bad arguments (empty names, TTL <= 0, tokens < 1) raise ``ValueError`` before any I/O.
"""

from ordermesh_shared.coordination.election import Election
from ordermesh_shared.coordination.errors import (
    CampaignTimeout,
    CoordinationError,
    CoordinationUnavailable,
    LockBusy,
    LockTimeout,
    StaleToken,
)
from ordermesh_shared.coordination.fencing import current_token, fence
from ordermesh_shared.coordination.lease import LeaseKeeper
from ordermesh_shared.coordination.lock import HeldLock, Lock
from ordermesh_shared.coordination.term import LeaderElection, Term, Work, run_terms

__all__ = [
    "CampaignTimeout",
    "CoordinationError",
    "CoordinationUnavailable",
    "Election",
    "HeldLock",
    "LeaderElection",
    "LeaseKeeper",
    "Lock",
    "LockBusy",
    "LockTimeout",
    "StaleToken",
    "Term",
    "Work",
    "current_token",
    "fence",
    "run_terms",
]
