"""A per-instance circuit breaker: pybreaker's state machine made safe for asyncio.

pybreaker has no native asyncio support (``call_async`` needs tornado; ``call()`` on a
coroutine function records a success without awaiting it), so the awaited request runs inside
``with breaker.calling():``. pybreaker lets every concurrent call through while half-open;
:meth:`InstanceBreaker.guard` adds the gate that admits exactly one trial and rejects the
others at once. asyncio runs one task at a time, so admitting and marking the trial (with no
``await`` in between) cannot race.

A call that leaves the guarded block with an exception is a failure, including a timeout
and a cancellation (pybreaker counts any exception): raise inside the block only what says
the instance is sick (connection errors, timeouts, 5xx), and let 4xx answers out normally.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pybreaker

CLOSED = pybreaker.STATE_CLOSED
HALF_OPEN = pybreaker.STATE_HALF_OPEN
OPEN = pybreaker.STATE_OPEN

StateListener = Callable[["InstanceBreaker", str, str], None]
"""``(breaker, old_state, new_state)``, called on every state change."""


class BreakerRejected(Exception):
    """The breaker did not admit the call: it is open, or a half-open trial is in flight."""


class InstanceBreaker:
    """Consecutive-failure breaker for one instance, with a single half-open trial.

    >>> breaker = InstanceBreaker("payment-1", failures=5, reset_timeout=5.0)
    >>> if breaker.admits():                 # cheap: the balancer asks before picking
    ...     with breaker.guard(): await send()   # raises BreakerRejected if not admitted
    """

    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        reset_timeout: float = 5.0,
        on_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.state = CLOSED
        self.reset_timeout = reset_timeout
        self._on_change = on_change
        self._retry_at = 0.0  # monotonic time after which an open breaker admits a trial
        self._trial_in_flight = False
        # throw_new_error_on_trip=False: the failure that trips it is re-raised as is, so
        # the caller still learns what actually went wrong.
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=failures,
            reset_timeout=reset_timeout,
            listeners=[_Listener(self)],
            name=name,
            throw_new_error_on_trip=False,
        )

    def admits(self) -> bool:
        """Whether a call would be let through now (closed, or due for its one trial)."""
        if self.state == CLOSED:
            return True
        return not self._trial_in_flight and time.monotonic() >= self._retry_at

    def guard(self) -> _Guard:
        """``with breaker.guard():`` runs the block as a call; BreakerRejected if not admitted."""
        return _Guard(self)

    def _record_success(self) -> None:
        """A success of a call that skipped pybreaker: if failures were counted meanwhile (by
        calls running alongside), it resets them, as pybreaker does for every success; a
        breaker that is no longer closed is left to its own trial."""
        if self.state == CLOSED and self._breaker.fail_counter:
            with contextlib.suppress(pybreaker.CircuitBreakerError):
                self._breaker.call(_nothing)

    def _record_failure(self, exc: BaseException) -> None:
        """Let pybreaker judge a failure seen outside its ``calling()`` block (it counts it,
        and may trip), exactly as if it had been raised inside."""

        def fail() -> None:
            raise exc

        traceback = exc.__traceback__  # re-raising would add this frame to it
        with contextlib.suppress(BaseException):
            self._breaker.call(fail)
        exc.__traceback__ = traceback

    def _changed(self, old: str, new: str) -> None:
        self.state = new
        if new == OPEN:
            self._retry_at = time.monotonic() + self.reset_timeout
        if self._on_change is not None:
            self._on_change(self, old, new)


def _nothing() -> None:
    """A call that succeeds, to report a success to pybreaker."""


class _Guard:
    """The guard of one call. A class rather than a generator: it is on every call's path."""

    __slots__ = ("_calling", "_owner", "_trial")

    def __init__(self, owner: InstanceBreaker) -> None:
        self._owner = owner
        self._trial = False
        self._calling: Any = None

    def __enter__(self) -> None:
        owner = self._owner
        if owner.state == CLOSED and owner._breaker.fail_counter == 0:
            # The common case, kept cheap: a success would change nothing in pybreaker
            # (no failures to forget), so only a failure is handed to it, in __exit__.
            return
        if owner.state != CLOSED and not owner.admits():
            raise BreakerRejected(f"circuit open for {owner.name}")
        calling = owner._breaker.calling()
        try:
            calling.__enter__()
        except pybreaker.CircuitBreakerError as exc:
            # Our clock and pybreaker's (wall time) may disagree by a hair.
            raise BreakerRejected(str(exc)) from None
        # No await since admits(): nobody else can have taken the trial meanwhile.
        self._trial = owner.state != CLOSED
        owner._trial_in_flight = owner._trial_in_flight or self._trial
        self._calling = calling

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._calling is None:
            if exc is not None:
                self._owner._record_failure(exc)
            else:
                self._owner._record_success()
            return False
        try:
            return bool(self._calling.__exit__(exc_type, exc, tb))
        finally:
            if self._trial:
                self._owner._trial_in_flight = False


class _Listener(pybreaker.CircuitBreakerListener):
    """Forwards pybreaker's state changes to the owning InstanceBreaker."""

    def __init__(self, owner: InstanceBreaker) -> None:
        self._owner = owner

    def state_change(self, _cb: Any, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else CLOSED
        self._owner._changed(old, new_state.name)
