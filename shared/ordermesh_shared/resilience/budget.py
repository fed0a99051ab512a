"""Retry budget: retries to a service limited to a fraction of its recent requests.

Retries help when a few calls fail; during an outage they multiply the load on the service
that is trying to recover (three attempts per call triple it). A budget keeps retries under
``ratio`` of the requests of the last ``window`` seconds, plus ``min_retries`` per window so a
lone request after a quiet spell can still retry once.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RetryBudget:
    """Counts requests and retries over a sliding window of ``buckets`` slots.

    >>> budget = RetryBudget(ratio=0.2, window=10.0, min_retries=3)
    >>> budget.record_request()                 # every call, once
    >>> if budget.can_retry(): budget.record_retry()
    """

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        window: float = 10.0,
        min_retries: int = 3,
        buckets: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= ratio <= 1 or window <= 0 or min_retries < 0 or buckets < 1:
            raise ValueError("need 0 <= ratio <= 1, window > 0, min_retries >= 0, buckets >= 1")
        self.ratio = ratio
        self.min_retries = min_retries
        self._width = window / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._total_requests = 0
        self._total_retries = 0
        self._slot = int(clock() / self._width)
        self._clock = clock

    def record_request(self) -> None:
        """Count one call (not its retries)."""
        index = self._advance()
        self._requests[index] += 1
        self._total_requests += 1

    def can_retry(self) -> bool:
        """Whether one more retry stays within the budget."""
        self._advance()
        allowed = self.min_retries + int(self.ratio * self._total_requests)
        return self._total_retries < allowed

    def record_retry(self) -> None:
        """Count one retry actually made."""
        index = self._advance()
        self._retries[index] += 1
        self._total_retries += 1

    def _advance(self) -> int:
        """Drop the slots that slid out of the window; the index of the current slot."""
        slot = int(self._clock() / self._width)
        size = len(self._requests)
        # Cheap on the hot path: only when a slot boundary was crossed is anything cleared.
        for stale in range(self._slot + 1, min(slot, self._slot + size) + 1):
            index = stale % size
            self._total_requests -= self._requests[index]
            self._total_retries -= self._retries[index]
            self._requests[index] = self._retries[index] = 0
        self._slot = max(slot, self._slot)
        return self._slot % size
