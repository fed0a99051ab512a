"""What every service refuses at the door: oversized input and text Postgres cannot store.

:class:`BodyLimitMiddleware` answers 413 (JSON) for a body larger than ``MAX_BODY_BYTES``
before reading it: at once when ``Content-Length`` says so, and as soon as a streamed
(chunked) body passes the limit. :func:`refuse_unstorable_input` runs before every route's own
parameters are validated and answers 422 naming the field when a JSON body, a path or query
parameter or a header holds a NUL character or an unpaired surrogate: Postgres stores
neither, and a lone surrogate cannot even be encoded as UTF-8. It answers 431 naming the
header when one is longer than :data:`MAX_HEADER_CHARS`.

>>> app = FastAPI(dependencies=[Depends(refuse_unstorable_input)])
>>> app.add_middleware(BodyLimitMiddleware, max_bytes=65536)
>>> # POST {"customer_id": "al\\u0000ice"}  ->  422, loc ["body", "customer_id"]
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Longest header value accepted. Idempotency-Key, the one header stored, has its own tighter
# limit (200) where it is declared.
MAX_HEADER_CHARS = 8192

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# Cheap pre-check on the raw body: a JSON string can only hold NUL or a surrogate as an escape
# (\u0000, \udXXX) or, for a surrogate, as its raw bytes (ED A0-BF ..; json.loads lets those
# through as surrogates). False alarms (say "\\u0000" or a valid pair) only cost a parse.
_SUSPECT_BODY = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\xed[\xa0-\xbf]")
_MESSAGE = "must not contain NUL characters or unpaired surrogates (Postgres cannot store them)"


# Up to this declared size an oversized body is read off the wire and dropped (see below).
DRAIN_BYTES = 4 * 1024 * 1024


class BodyTooLarge(HTTPException):
    """The request body is larger than the service accepts (413).

    An ``HTTPException`` so that FastAPI, reading the body for a route, lets it through to the
    app's handler rather than turning it into a 400.
    """

    def __init__(self, limit: int) -> None:
        detail = f"request body larger than {limit} bytes"
        # Connection: close: the rest of a body whose end nobody knows is never read.
        super().__init__(status_code=413, detail=detail, headers={"Connection": "close"})


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``, decided before the body (or the rest of it) is read."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared > self.max_bytes:
            await _send_too_large(send, self.max_bytes, close=declared > DRAIN_BYTES)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            # Read outside a route (no handler saw it): answer here unless an answer began.
            if started:
                raise
            await _send_too_large(send, self.max_bytes)


def _declared_length(scope: Scope) -> int:
    try:
        return int(Headers(scope=scope).get("content-length") or 0)
    except ValueError:
        return 0  # the server refuses a malformed Content-Length before we see it


async def _send_too_large(send: Send, limit: int, *, close: bool = True) -> None:
    body = orjson.dumps({"detail": BodyTooLarge(limit).detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    # Closing with the body's rest unread makes the kernel reset the connection, and a client
    # still sending then gets a reset instead of this answer. For a declared length up to
    # DRAIN_BYTES the connection stays open and the server reads the rest and discards it
    # (no parsing, no buffering); past that, or for a body of unknown length, it closes.
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HeaderTooLarge(HTTPException):
    """A request header is longer than the service accepts (431)."""

    def __init__(self, name: str) -> None:
        detail = f"header {name} is longer than {MAX_HEADER_CHARS} characters"
        super().__init__(status_code=431, detail=detail)


async def refuse_unstorable_input(request: Request) -> None:
    """App-wide dependency: 431 for an oversized header, 422 for text Postgres cannot store."""
    for name, value in request.headers.items():
        if len(value) > MAX_HEADER_CHARS:
            raise HeaderTooLarge(name)
    errors = [
        *_bad_params("header", request.headers.items()),
        *_bad_params("path", request.path_params.items()),
        *_bad_params("query", request.query_params.multi_items()),
        *_bad_body(await request.body()),
    ]
    if errors:
        raise RequestValidationError(errors)


def unstorable(text: str) -> bool:
    """True when Postgres cannot store ``text`` (a NUL, or a surrogate without its pair)."""
    return _UNSTORABLE.search(text) is not None


def _bad_params(kind: str, items: Any) -> Iterator[dict[str, Any]]:
    for name, value in items:
        for text in (name, value):
            if isinstance(text, str) and unstorable(text):
                yield _error((kind, name), text)
                break


def _bad_body(body: bytes) -> Iterator[dict[str, Any]]:
    if not body or _SUSPECT_BODY.search(body) is None:
        return
    try:
        # As FastAPI parses it (bytes in: surrogates pass), so we see the strings it sees.
        document = json.loads(body)
    except ValueError:
        return  # not JSON: FastAPI has refused it already, or the route takes no JSON
    for loc, text in _strings(document, ("body",)):
        if unstorable(text):
            yield _error(loc, text)


def _strings(value: Any, loc: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, str):
        yield loc, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield (*loc, key), key
            yield from _strings(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*loc, index))


def _error(loc: tuple[str | int, ...], text: str) -> dict[str, Any]:
    # ascii(): the answer must itself be encodable, so the offending text is shown escaped.
    shown = [part if isinstance(part, int) else ascii(part)[1:-1] for part in loc]
    return {
        "type": "string_unstorable",
        "loc": tuple(shown),
        "msg": f"{'.'.join(str(p) for p in shown[1:]) or shown[0]} {_MESSAGE}",
        "input": ascii(text)[1:-1][:200],
    }
