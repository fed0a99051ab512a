"""Errors of :mod:`ordermesh_shared.coordination` (the hierarchy is in the package docstring)."""

from __future__ import annotations


class CoordinationError(Exception):
    """etcd refused a lock or election request, or answered something unexpected."""


class CoordinationUnavailable(CoordinationError):
    """etcd could not be reached or did not answer in time; the message says what to check."""


class LockBusy(CoordinationError):
    """The lock is held by someone else (``try_hold``), or stayed held for the whole wait."""


class LockTimeout(LockBusy, TimeoutError):
    """``hold(timeout=...)`` waited the whole timeout and the lock stayed held elsewhere."""


class StaleToken(CoordinationError):
    """A fenced write carried a token older than one the resource has already accepted.

    The writer has lost its lock or leadership (maybe while paused): it must stop writing,
    and acquire again to get a new token.
    """

    def __init__(self, resource: str, token: int, current: int) -> None:
        super().__init__(
            f"write to {resource!r} with fencing token {token} rejected: token {current} was "
            "already used by a newer holder; this holder lost its lock or leadership, so stop "
            "and acquire again"
        )
        self.resource = resource
        self.token = token
        self.current = current


class CampaignTimeout(CoordinationError, TimeoutError):
    """``lead(timeout=...)`` waited the whole timeout while someone else stayed leader."""
