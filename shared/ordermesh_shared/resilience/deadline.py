"""Deadlines that travel from caller to callee.

A request carries ``X-Deadline-Ms``: the milliseconds the caller will still wait for the
answer, counted when the request left it. Relative rather than absolute (as gRPC's
``grpc-timeout``) so the two hosts' clocks need not agree; the time on the wire is the only
error, and it only makes the callee a little more generous than the caller.

:class:`DeadlineMiddleware` reads the header on every request of a service. A request whose
deadline has already passed is answered 504 without running the app; otherwise the deadline
is put in a context variable for the request, so every :class:`ServiceClient` call made while
serving it is bounded by what is left, and the app is cancelled when the deadline passes (an
answer nobody waits for is work wasted, or worse, a side effect the caller never learns of).

    with deadline_scope(0.3):            # this block, and every call in it: 300 ms at most
        await clients.payment.get("/customers/alice")
    remaining()                           # seconds left in the current scope, None: no deadline

Work that outlives the request which started it (a saga, a compensation) must not inherit the
request's deadline: start its task with ``context=without_deadline()`` and give it a budget of
its own with :func:`own_deadline`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import Context, ContextVar, copy_context

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEADLINE_HEADER = "X-Deadline-Ms"
_HEADER_KEY = DEADLINE_HEADER.lower().encode()

# time.monotonic() at which the current request's (or scope's) deadline passes; None: none.
_deadline: ContextVar[float | None] = ContextVar("ordermesh_deadline", default=None)


def current_deadline() -> float | None:
    """The current deadline as a ``time.monotonic()`` value, or None when there is none."""
    return _deadline.get()


def remaining() -> float | None:
    """Seconds left before the current deadline (negative once passed), or None."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


@contextmanager
def deadline_scope(seconds: float) -> Iterator[float]:
    """Bound the block to ``seconds`` (never extending an enclosing deadline); yields it."""
    wanted = time.monotonic() + seconds
    enclosing = _deadline.get()
    deadline = wanted if enclosing is None else min(wanted, enclosing)
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


@contextmanager
def own_deadline(seconds: float) -> Iterator[float]:
    """A fresh budget of ``seconds`` for the block, ignoring any enclosing deadline; yields it.

    >>> with own_deadline(3.0):          # a saga step: its own 3 s, whoever started the saga
    ...     await clients.payment.post("/payments", json=body, idempotency_key=key)
    """
    deadline = time.monotonic() + seconds
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


def without_deadline() -> Context:
    """A copy of the current context with no deadline in it, for a task that outlives the
    request starting it: ``asyncio.create_task(run_saga(), context=without_deadline())``."""
    context = copy_context()
    context.run(_deadline.set, None)
    return context


def header_value(seconds: float) -> str:
    """The header's value for ``seconds`` left (whole milliseconds, never below zero)."""
    return str(max(0, int(seconds * 1000)))


class DeadlineMiddleware:
    """ASGI middleware: honour the caller's ``X-Deadline-Ms`` (see the module docstring).

    >>> app.add_middleware(DeadlineMiddleware)
    >>> # a request with "X-Deadline-Ms: 0" gets 504 at once; with 300, at most ~300 ms of work
    >>> remaining()   # inside a route: seconds the caller still waits
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = _header(scope)
        if raw is None:
            await self.app(scope, receive, send)
            return
        try:
            budget_ms = int(raw)
        except ValueError:
            await _answer(send, 400, f"{DEADLINE_HEADER} must be whole milliseconds, got {raw!r}")
            return
        if budget_ms <= 0:
            await _answer(send, 504, "deadline already passed on arrival; nothing was done")
            return
        await self._run_within(budget_ms / 1000, scope, receive, send)

    async def _run_within(self, seconds: float, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        with deadline_scope(seconds):
            try:
                async with asyncio.timeout(seconds) as limit:
                    await self.app(scope, receive, tracking_send)
            except TimeoutError:
                # Not our deadline (the app's own timeout), or half an answer is already out
                # (then the server closes the connection): nothing sensible to add.
                if started or not limit.expired():
                    raise
                await _answer(send, 504, "deadline passed while serving; the work was cancelled")


def _header(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == _HEADER_KEY:
            return str(value.decode("latin-1"))
    return None


async def _answer(send: Send, status: int, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
