"""How a service's writers wake the outbox relay that runs in their own process.

A write that adds an outbox event used to ``NOTIFY`` on commit, for every event: Postgres
commits notifying transactions one at a time, cluster-wide, and each notification woke the
relay for a batch of its own. When this process's relay leads, a writer skips the NOTIFY and
rings the bell after its commit instead (no round trip, no server-wide serialisation); only
when the leader is elsewhere (another replica, or none yet) does it NOTIFY.

>>> notify = db.bell.notify_others          # decided before the write
>>> await conn.execute(sql_with_or_without_notify)
>>> db.bell.ring()                          # after the commit: the relay here looks
"""

from __future__ import annotations

import asyncio


class RelayBell:
    """Counts the outbox events this process has committed, and wakes its leading relay.

    A leader lost between a writer's check and its commit leaves that event to the new
    leader's first look at its term's start, or to its poll: late, never lost.
    """

    def __init__(self) -> None:
        self._wakeup: asyncio.Event | None = None
        self._rung = 0

    @property
    def notify_others(self) -> bool:
        """True when no relay here leads: a write must NOTIFY, whoever leads must hear it."""
        return self._wakeup is None

    @property
    def rung(self) -> int:
        """Events committed by this process so far (the relay compares it with its last look)."""
        return self._rung

    def ring(self, events: int = 1) -> None:
        """Call after the commit of a write that added ``events`` outbox events."""
        self._rung += events
        if self._wakeup is not None:
            self._wakeup.set()

    def lead(self, wakeup: asyncio.Event) -> None:
        """The relay here leads from now on, and waits on ``wakeup``."""
        self._wakeup = wakeup

    def step_down(self) -> None:
        """The relay here no longer leads: writers NOTIFY again."""
        self._wakeup = None
