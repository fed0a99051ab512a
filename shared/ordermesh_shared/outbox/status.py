"""What this instance's outbox relay is doing, for ``/health/ready`` and the admin API.

The state that needs a person is ``fenced_out``: this instance leads the relay election, but
Postgres's fence holds a newer token than its term's. A stale leader meets that for a moment
and steps down; a leader that keeps meeting it means etcd's revisions went backwards (etcd
lost its data, or the service was pointed at another etcd), and no term will ever be let in
until an operator re-bases the fence (``ordermesh-outbox rebase-fence``, see the README).

>>> status = RelayStatus("order")
>>> health.add_check("outbox_relay", status.check, critical=False)
>>> health.add_detail("outbox_relay", status.as_json)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

RelayState = Literal["standby", "leading", "fenced_out"]


def rebase_command(service: str) -> str:
    """The operator's way back from a fence that etcd's revisions can no longer reach."""
    return f"ordermesh-outbox rebase-fence --service {service}"


class RelayFencedOut(Exception):
    """The readiness check's failure: this instance's relay term is refused at the fence."""


@dataclass(frozen=True, slots=True)
class _Snapshot:
    state: RelayState
    since: datetime
    term_token: int | None = None
    stored_token: int | None = None


class RelayStatus:
    """The relay's state as it changes (``standby``, ``leading``, ``fenced_out``).

    >>> status.fenced_out(term_token=3, stored_token=4127)
    >>> await status.as_json()   # {"state": "fenced_out", "term_token": 3, ... "command": ...}
    >>> await status.check()     # raises RelayFencedOut (an advisory readiness check)
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self._now = _Snapshot("standby", datetime.now(UTC))

    @property
    def state(self) -> RelayState:
        return self._now.state

    def standby(self) -> None:
        """Not leading: another instance relays, or this one campaigns."""
        self._set(_Snapshot("standby", datetime.now(UTC)))

    def leading(self, *, term_token: int) -> None:
        """Leading, and the fence accepted this term's token."""
        self._set(_Snapshot("leading", datetime.now(UTC), term_token))

    def fenced_out(self, *, term_token: int, stored_token: int | None) -> None:
        """Leading, but the fence refuses this term: a newer token is stored."""
        self._set(_Snapshot("fenced_out", datetime.now(UTC), term_token, stored_token))

    async def as_json(self) -> dict[str, Any]:
        """The readiness detail: the state, and in ``fenced_out`` both tokens and what to do."""
        now = self._now
        body: dict[str, Any] = {"state": now.state, "since": now.since.isoformat()}
        if now.term_token is not None:
            body["term_token"] = now.term_token
        if now.state == "fenced_out":
            body["stored_token"] = now.stored_token
            body["hint"] = self._hint()
            body["command"] = rebase_command(self.service)
        return body

    async def check(self) -> None:
        """Raises :class:`RelayFencedOut` while fenced out (a readiness check)."""
        if self._now.state == "fenced_out":
            raise RelayFencedOut(self._hint())

    def _set(self, snapshot: _Snapshot) -> None:
        same = (snapshot.state, snapshot.term_token) == (self._now.state, self._now.term_token)
        if not same or snapshot.stored_token != self._now.stored_token:
            self._now = snapshot  # keep `since` while nothing changes

    def _hint(self) -> str:
        now = self._now
        return (
            f"relay term {now.term_token} is fenced out by stored token {now.stored_token}: "
            "etcd's revisions are behind Postgres's fence (etcd lost its data?); no event is "
            "published until an operator checks and runs "
            f"`{rebase_command(self.service)}`"
        )
