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

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the block as a call through the breaker; BreakerRejected if not admitted."""
        if not self.admits():
            raise BreakerRejected(f"circuit open for {self.name}")
        trial = self.state != CLOSED
        self._trial_in_flight = trial
        try:
            with _pybreaker_calling(self._breaker):
                yield
        finally:
            if trial:
                self._trial_in_flight = False

    def _changed(self, old: str, new: str) -> None:
        self.state = new
        if new == OPEN:
            self._retry_at = time.monotonic() + self.reset_timeout
        if self._on_change is not None:
            self._on_change(self, old, new)


@contextmanager
def _pybreaker_calling(breaker: pybreaker.CircuitBreaker) -> Iterator[None]:
    # Our clock and pybreaker's (wall time) may disagree by a hair: translate its own refusal.
    # The block itself never raises CircuitBreakerError (throw_new_error_on_trip=False).
    try:
        with breaker.calling():
            yield
    except pybreaker.CircuitBreakerError as exc:
        raise BreakerRejected(str(exc)) from None


class _Listener(pybreaker.CircuitBreakerListener):
    """Forwards pybreaker's state changes to the owning InstanceBreaker."""

    def __init__(self, owner: InstanceBreaker) -> None:
        self._owner = owner

    def state_change(self, _cb: Any, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else CLOSED
        self._owner._changed(old, new_state.name)
