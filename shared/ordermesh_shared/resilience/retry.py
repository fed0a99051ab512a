"""When and how long to wait before trying again, on tenacity.

Retried: connection errors, timeouts, 502/503/504, and 429 (after its ``Retry-After``). Never
another 4xx. A request that may change state (POST/PUT/PATCH/DELETE) is resent only with an
idempotency key, unless it surely never left (the connection was refused). Waits are
exponential with full jitter (``wait_random_exponential``: uniform in [0, min(cap, base*2^n)]),
so callers that failed together do not come back together. The loop stops at the attempt
limit, when the wait would not leave time for one more attempt before the deadline, and when
the target's retry budget is spent, in that order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, wait_random_exponential
from tenacity.stop import stop_any, stop_base

from ordermesh_shared.resilience.errors import UpstreamError

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MIN_ATTEMPT_TIME = 0.01  # seconds: below this before the deadline, another attempt is pointless


class AttemptFailed(Exception):
    """One attempt's failure as the retry loop sees it: the public error, and whether (and
    after how long, from ``Retry-After``) it may be retried."""

    def __init__(
        self, error: UpstreamError, *, retryable: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None  # unparseable: fall back to our own backoff


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Attempt limit and backoff; :meth:`retrying` builds the tenacity loop for one call.

    >>> schedule = RetrySchedule(max_attempts=3, backoff=0.05, backoff_cap=1.0)
    >>> loop = schedule.retrying(time_left=call.time_left, out_of_budget=call.out_of_budget,
    ...                          before_retry=call.count_retry)
    >>> answer = await loop(attempt, call)    # re-raises the last AttemptFailed when it stops
    """

    max_attempts: int = 3
    backoff: float = 0.05
    backoff_cap: float = 1.0

    def retrying(
        self,
        *,
        time_left: Callable[[], float],
        out_of_budget: Callable[[RetryCallState], bool],
        before_retry: Callable[[RetryCallState], None],
    ) -> AsyncRetrying:
        # A fresh AsyncRetrying per call: tenacity keeps per-run state on the object.
        jitter = wait_random_exponential(multiplier=self.backoff, max=self.backoff_cap)

        def wait(state: RetryCallState) -> float:
            failed = _failure(state)
            if failed is not None and failed.retry_after is not None:
                return failed.retry_after  # the callee said when; our jitter would be too soon
            return float(jitter(state))

        def out_of_time(state: RetryCallState) -> bool:
            return time_left() - state.upcoming_sleep < MIN_ATTEMPT_TIME

        return AsyncRetrying(
            # Checked left to right, each only if the previous did not stop: the budget is
            # consulted (and its refusal counted) only for a retry that would really happen.
            stop=stop_any(
                stop_after_attempt(self.max_attempts), _When(out_of_time), _When(out_of_budget)
            ),
            wait=wait,
            retry=_retryable,
            before_sleep=before_retry,
            reraise=True,
        )


class _When(stop_base):
    """A predicate as a tenacity stop condition."""

    def __init__(self, predicate: Callable[[RetryCallState], bool]) -> None:
        self._predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._predicate(retry_state)


def _failure(state: RetryCallState) -> AttemptFailed | None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None and outcome.failed else None
    return error if isinstance(error, AttemptFailed) else None


def _retryable(state: RetryCallState) -> bool:
    failed = _failure(state)
    return failed is not None and failed.retryable
