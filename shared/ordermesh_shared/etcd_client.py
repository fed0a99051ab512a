"""A thin asyncio client for etcd's v3 JSON gateway (checked against etcd 3.4), over aiohttp.

No maintained Python etcd client works today (see DESIGN.md), and the gateway is plain JSON
over HTTP, so this module speaks it directly. It hides the gateway's quirks: keys and values
travel as base64, int64 fields arrive as JSON strings, zero/false fields are omitted, and
streaming endpoints wrap each message in ``{"result": ...}``.

Every failure leaves this module as one of these (never as an aiohttp or httpx exception)::

    EtcdError               etcd refused the request, or answered something unexpected
    ├── EtcdUnavailable     etcd could not be reached, did not answer in time, or a stream broke
    ├── LeaseNotFound       the lease expired or was revoked (grant a new one)
    ├── NotLeader           proclaim with a leader key that no longer holds the election
    ├── WaitTimeout         lock, campaign, watch or observe waited longer than its own timeout
    └── WatchCompacted      the watch's start revision was compacted away (re-list, then watch)

Keys are ``str`` (UTF-8); values are ``bytes`` on the way out and ``str | bytes`` on the way in.
How requests travel (aiohttp, or an httpx transport in tests) is ``etcd_http.py``'s business.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import httpx
import orjson

from ordermesh_shared.etcd_http import (
    OK,
    AiohttpEtcdHttp,
    EtcdHttp,
    HttpFailure,
    HttpxEtcdHttp,
    Streamed,
    lines,
)

__all__ = [
    "Compare",
    "Delete",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "EventType",
    "KeyValue",
    "LeaderKey",
    "LeaseNotFound",
    "LockKey",
    "NotLeader",
    "Put",
    "TxnResult",
    "WaitTimeout",
    "WatchBatch",
    "WatchCompacted",
    "WatchEvent",
    "prefix_range_end",
]

Json = dict[str, Any]

# gRPC status codes the gateway passes through that mean "try again later", not "you erred".
_GRPC_DEADLINE_EXCEEDED = 4
_GRPC_UNAVAILABLE = 14


class EtcdError(Exception):
    """etcd refused a request or answered something this client does not understand."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached, did not answer in time, or a stream to it broke."""


class LeaseNotFound(EtcdError):
    """The lease does not exist (any more): it expired or was revoked."""


class NotLeader(EtcdError):
    """The leader key no longer holds its election (resigned, or its lease expired)."""


class WaitTimeout(EtcdError):
    """A blocking call (lock, campaign, watch, observe) waited longer than its own timeout."""


class _NoLeader(EtcdError):
    """Nobody leads the election (an answer of ``leader``, not a failure)."""


class WatchCompacted(EtcdError):
    """The revision a watch wanted to start from was compacted: re-list, then watch again."""

    def __init__(self, message: str, *, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored in etcd. ``lease`` is 0 when the key has no lease."""

    key: str
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change to one key; for DELETE, ``kv`` carries the key and ``mod_revision`` only."""

    type: EventType
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """The events of one watch response, all applied at store revision ``revision``."""

    revision: int
    events: tuple[WatchEvent, ...]


@dataclass(frozen=True, slots=True)
class LockKey:
    """A held lock. ``revision`` strictly increases from one holder of a lock to the next,
    so it serves as the fencing token a protected resource checks."""

    key: str
    revision: int


@dataclass(frozen=True, slots=True)
class LeaderKey:
    """Proof of leadership returned by :meth:`EtcdClient.campaign`; pass it to proclaim/resign."""

    name: str
    key: str
    rev: int
    lease: int


@dataclass(frozen=True, slots=True)
class Compare:
    """A txn guard on one key, e.g. ``Compare("k", "CREATE", "=", 0)``: "k" does not exist."""

    key: str
    target: Literal["CREATE", "MOD", "VERSION"]
    op: Literal["=", "!=", "<", ">"]
    value: int


@dataclass(frozen=True, slots=True)
class Put:
    """A txn operation writing ``value`` at ``key``, optionally attached to a lease."""

    key: str
    value: str | bytes
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """A txn operation deleting ``key``."""

    key: str


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Whether the compares held (so ``success`` ran) and the store revision afterwards."""

    succeeded: bool
    revision: int


# ---------------------------------------------------------------------------------------------
# Codec: pure functions between Python values and the gateway's JSON.


def encode(data: str | bytes) -> str:
    """Base64 text for a key or value, as the gateway expects."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def decode_bytes(text: str) -> bytes:
    return base64.b64decode(text)


def decode_key(text: str) -> str:
    # surrogateescape: a non-UTF-8 key still round-trips through encode() unchanged.
    return decode_bytes(text).decode("utf-8", "surrogateescape")


def int_field(obj: Json, name: str) -> int:
    """An int64 field: sent as a JSON string, and left out entirely when it is zero."""
    return int(obj.get(name, 0))


def header_revision(body: Json) -> int:
    return int_field(body.get("header", {}), "revision")


def prefix_range_end(prefix: str | bytes) -> bytes:
    """The exclusive end of the key range holding every key that starts with ``prefix``."""
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while raw and raw[-1] == 0xFF:
        raw.pop()  # 0xff cannot be incremented: the range ends after the shorter prefix
    if not raw:
        return b"\x00"  # etcd's "no upper bound"
    raw[-1] += 1
    return bytes(raw)


def decode_kv(obj: Json) -> KeyValue:
    return KeyValue(
        key=decode_key(obj.get("key", "")),
        value=decode_bytes(obj.get("value", "")),
        create_revision=int_field(obj, "create_revision"),
        mod_revision=int_field(obj, "mod_revision"),
        version=int_field(obj, "version"),
        lease=int_field(obj, "lease"),
    )


def decode_event(obj: Json) -> WatchEvent:
    # PUT is enum value 0, so the gateway omits "type" for puts.
    return WatchEvent(type=EventType(obj.get("type", "PUT")), kv=decode_kv(obj.get("kv", {})))


def decode_leader_key(obj: Json) -> LeaderKey:
    return LeaderKey(
        name=decode_key(obj.get("name", "")),
        key=decode_key(obj.get("key", "")),
        rev=int_field(obj, "rev"),
        lease=int_field(obj, "lease"),
    )


def encode_leader_key(leader: LeaderKey) -> Json:
    return {
        "name": encode(leader.name),
        "key": encode(leader.key),
        "rev": str(leader.rev),
        "lease": str(leader.lease),
    }


def error_from_answer(path: str, body: Json) -> EtcdError:
    """The exception for an error answer, in either the unary or the streaming shape."""
    error = body.get("error")
    if isinstance(error, dict):  # streams: {"error": {"grpc_code": 14, "message": ...}}
        message, code = str(error.get("message", "")), int(error.get("grpc_code", 0))
    else:  # unary calls: {"error": "...", "message": "...", "code": 5}
        message, code = str(body.get("message") or error or ""), int(body.get("code", 0))
    if "lease not found" in message:
        return LeaseNotFound(f"etcd {path}: {message}")
    if message == "election: not leader":
        return NotLeader(f"etcd {path}: {message}")
    if message == "election: no leader":
        return _NoLeader(f"etcd {path}: {message}")
    if code in (_GRPC_DEADLINE_EXCEEDED, _GRPC_UNAVAILABLE):
        return EtcdUnavailable(f"etcd {path}: {message} (it may have no leader or be overloaded)")
    return EtcdError(f"etcd {path} failed: {message or body!r} (gRPC code {code})")


def parse_json(path: str, raw: bytes) -> Json:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EtcdError(f"etcd {path} answered non-JSON: {raw[:200]!r}") from exc
    if not isinstance(body, dict):
        raise EtcdError(f"etcd {path} answered {body!r}, expected a JSON object")
    return body


def stream_result(path: str, body: Json) -> Json:
    """Unwrap one message of a streaming endpoint, raising for an error message."""
    if "error" in body:
        raise error_from_answer(path, body)
    result = body.get("result")
    if not isinstance(result, dict):
        raise EtcdError(f"etcd {path} streamed {body!r}, expected a result")
    return result


def keepalive_ttl(lease_id: int, result: Json) -> int:
    """The TTL a keepalive answer grants; an expired lease answers with no TTL at all."""
    ttl = int_field(result, "TTL")
    if ttl <= 0:
        raise LeaseNotFound(f"lease {lease_id:x} has expired or was revoked")
    return ttl


def watch_batch(result: Json) -> WatchBatch | None:
    """The events of one watch message; None for messages without events (the created header)."""
    if result.get("canceled"):
        compacted = int_field(result, "compact_revision")
        if compacted:
            raise WatchCompacted(
                f"watch start revision was compacted (oldest kept: {compacted})",
                compact_revision=compacted,
            )
        raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason') or 'no reason'}")
    events = result.get("events")
    if not events:
        return None
    return WatchBatch(header_revision(result), tuple(decode_event(e) for e in events))


def encode_compare(compare: Compare) -> Json:
    results = {"=": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
    fields = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version"}
    return {
        "key": encode(compare.key),
        "target": compare.target,
        "result": results[compare.op],
        fields[compare.target]: str(compare.value),
    }


def encode_op(op: Put | Delete) -> Json:
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": encode(op.key)}}
    put: Json = {"key": encode(op.key), "value": encode(op.value)}
    if op.lease is not None:
        put["lease"] = str(op.lease)
    return {"request_put": put}


# ---------------------------------------------------------------------------------------------


class EtcdClient:
    """An async etcd v3 client over the JSON gateway; one pooled aiohttp session inside.

    >>> async with EtcdClient("http://127.0.0.1:2379") as etcd:
    ...     revision = await etcd.put("/config/mode", "blue")
    ...     kv = await etcd.get("/config/mode")  # KeyValue(key='/config/mode', value=b'blue', ...)

    Every call is bounded by ``timeout`` seconds. The calls that wait for something to happen
    take their own bound instead (``lock``/``campaign``: ``timeout``; ``watch_prefix``/
    ``observe``: ``idle_timeout`` per message); None waits forever. Connecting stays bounded
    by the default, so an absent etcd fails fast whatever the call. ``transport`` (an httpx
    transport, e.g. ``httpx.MockTransport``) replaces the network, for tests.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._transport = transport
        self._client: EtcdHttp | None = None

    async def __aenter__(self) -> Self:
        if self._transport is None:
            http: EtcdHttp = AiohttpEtcdHttp(self.url, connect_timeout=self._timeout)
        else:
            http = HttpxEtcdHttp(self.url, transport=self._transport, connect_timeout=self._timeout)
        self._client = await http.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (what leaving ``async with`` does)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- key-value ------------------------------------------------------------------------

    async def put(self, key: str, value: str | bytes, *, lease: int | None = None) -> int:
        """Write ``value`` at ``key`` (attached to ``lease`` if given); returns the new revision."""
        body: Json = {"key": encode(key), "value": encode(value)}
        if lease is not None:
            body["lease"] = str(lease)
        return header_revision(await self._call("/v3/kv/put", body))

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None if it does not exist."""
        answer = await self._call("/v3/kv/range", {"key": encode(key)})
        kvs = answer.get("kvs") or []
        return decode_kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, and the store revision the listing reflects.

        Watch from ``revision + 1`` to miss nothing that happens after the listing.
        """
        body = {"key": encode(prefix), "range_end": encode(prefix_range_end(prefix))}
        answer = await self._call("/v3/kv/range", body)
        return [decode_kv(kv) for kv in answer.get("kvs", [])], header_revision(answer)

    async def delete(self, key: str) -> int:
        """Delete ``key``; returns how many keys were deleted (0 or 1)."""
        answer = await self._call("/v3/kv/deleterange", {"key": encode(key)})
        return int_field(answer, "deleted")

    async def txn(
        self,
        compare: Sequence[Compare],
        *,
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        """Atomically: if every ``compare`` holds, run ``success``, else ``failure``.

        >>> # create "k" only if it does not exist yet:
        >>> await etcd.txn([Compare("k", "CREATE", "=", 0)], success=[Put("k", "v")])
        """
        body = {
            "compare": [encode_compare(c) for c in compare],
            "success": [encode_op(op) for op in success],
            "failure": [encode_op(op) for op in failure],
        }
        answer = await self._call("/v3/kv/txn", body)
        return TxnResult(bool(answer.get("succeeded", False)), header_revision(answer))

    # -- leases ---------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd raises it to its minimum TTL); returns its id."""
        return int_field(await self._call("/v3/lease/grant", {"TTL": str(ttl)}), "ID")

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease once; returns its TTL. Raises LeaseNotFound if it already expired."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)})
        return keepalive_ttl(lease_id, stream_result("/v3/lease/keepalive", answer))

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease: every key attached to it is deleted at once."""
        await self._call("/v3/lease/revoke", {"ID": str(lease_id)})

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds the lease has left. Raises LeaseNotFound if it expired or was revoked."""
        answer = await self._call("/v3/lease/timetolive", {"ID": str(lease_id)})
        if int_field(answer, "TTL") < 0:  # the gateway says -1 rather than an error
            raise LeaseNotFound(f"lease {lease_id:x} has expired or was revoked")
        return int_field(answer, "TTL")

    # -- watch ----------------------------------------------------------------------------

    async def watch_prefix(
        self, prefix: str, *, start_revision: int, idle_timeout: float | None = None
    ) -> AsyncGenerator[WatchBatch, None]:
        """Yield batches of changes under ``prefix`` from ``start_revision`` on, until cancelled.

        ``idle_timeout`` bounds the wait for each next batch (None: wait forever). Raises
        EtcdUnavailable when the stream breaks and WatchCompacted when ``start_revision`` is
        gone: either way, re-list with :meth:`get_prefix` and watch again. Close it with
        ``contextlib.aclosing`` if you stop iterating before it raises.
        """
        request = {
            "key": encode(prefix),
            "range_end": encode(prefix_range_end(prefix)),
            "start_revision": str(start_revision),
        }
        async for result in self._stream("/v3/watch", {"create_request": request}, idle_timeout):
            batch = watch_batch(result)
            if batch is not None:
                yield batch

    # -- locks ----------------------------------------------------------------------------

    async def lock(
        self,
        name: str,
        *,
        lease: int,
        # Our own bound (not only the caller's asyncio.timeout) so giving up is a WaitTimeout.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> LockKey:
        """Block until this lease holds the lock ``name`` (or ``timeout`` passes: WaitTimeout).

        The lock lives as long as ``lease``: keep the lease alive while you hold it.
        Locking again with the same lease returns the lock already held.
        """
        body = {"name": encode(name), "lease": str(lease)}
        answer = await self._call_waiting(
            "/v3/lock/lock", body, limit=timeout, what=f"lock {name!r}"
        )
        return LockKey(key=decode_key(answer["key"]), revision=header_revision(answer))

    async def unlock(self, key: str) -> None:
        """Release a lock by the key :meth:`lock` returned (no error if already released)."""
        await self._call("/v3/lock/unlock", {"key": encode(key)})

    # -- elections ------------------------------------------------------------------------

    async def campaign(
        self,
        name: str,
        *,
        lease: int,
        value: str | bytes,
        timeout: float | None = None,  # noqa: ASYNC109 (see lock)
    ) -> LeaderKey:
        """Block until elected leader of ``name`` announcing ``value`` (or WaitTimeout).

        Leadership lasts while ``lease`` lives; keep it alive, and step down if it is lost.
        """
        body = {"name": encode(name), "lease": str(lease), "value": encode(value)}
        answer = await self._call_waiting(
            "/v3/election/campaign", body, limit=timeout, what=f"campaign for {name!r}"
        )
        return decode_leader_key(answer["leader"])

    async def proclaim(self, leader: LeaderKey, value: str | bytes) -> None:
        """Announce a new value as the current leader; NotLeader if leadership was lost."""
        body = {"leader": encode_leader_key(leader), "value": encode(value)}
        await self._call("/v3/election/proclaim", body)

    async def leader(self, name: str) -> KeyValue | None:
        """The current leader's key and value, or None if nobody leads ``name``."""
        try:
            answer = await self._call("/v3/election/leader", {"name": encode(name)})
        except _NoLeader:
            return None
        return decode_kv(answer["kv"])

    async def observe(
        self, name: str, *, idle_timeout: float | None = None
    ) -> AsyncGenerator[KeyValue, None]:
        """Yield the leader of ``name`` now (if any) and at every change of leader or value.

        ``idle_timeout`` bounds the wait for each next change (None: wait forever); raises
        EtcdUnavailable when the stream breaks.
        """
        async for result in self._stream(
            "/v3/election/observe", {"name": encode(name)}, idle_timeout
        ):
            yield decode_kv(result["kv"])

    async def resign(self, leader: LeaderKey) -> None:
        """Give up leadership so the next campaigner is elected at once."""
        await self._call("/v3/election/resign", {"leader": encode_leader_key(leader)})

    # -- transport ------------------------------------------------------------------------

    def _http(self) -> EtcdHttp:
        if self._client is None:
            raise RuntimeError("use EtcdClient as 'async with EtcdClient(url) as etcd: ...'")
        return self._client

    async def _call(self, path: str, body: Json) -> Json:
        """POST one request under the default timeout and decode its answer."""
        try:
            return await self._send(path, body, limit=self._timeout)
        except TimeoutError:
            raise EtcdUnavailable(
                f"etcd at {self.url} did not answer {path} within {self._timeout} s; "
                "check that it is running, not paused, and not overloaded"
            ) from None

    async def _call_waiting(self, path: str, body: Json, *, limit: float | None, what: str) -> Json:
        """POST a request that blocks server-side until something happens (lock, campaign)."""
        try:
            return await self._send(path, body, limit=limit)
        except TimeoutError:
            raise WaitTimeout(
                f"{what} did not complete within {limit} s "
                f"(held elsewhere, or etcd at {self.url} is stalled)"
            ) from None

    async def _send(self, path: str, body: Json, *, limit: float | None) -> Json:
        try:
            status, content = await self._http().post(path, orjson.dumps(body), limit=limit)
        except HttpFailure as exc:
            raise _translated(exc) from exc
        answer = parse_json(path, content)
        if status != OK or "error" in answer:
            raise error_from_answer(path, answer)
        return answer

    async def _stream(
        self, path: str, body: Json, idle: float | None
    ) -> AsyncGenerator[Json, None]:
        """POST to a streaming endpoint and yield each message's result as it arrives.

        ``idle`` bounds the wait for the answer's head and then for each next message.
        """
        try:
            async with contextlib.AsyncExitStack() as stack:
                answer = await self._stream_head(stack, path, body, idle)
                if answer.status != OK:
                    raise error_from_answer(path, parse_json(path, await answer.read()))
                messages = await stack.enter_async_context(
                    contextlib.aclosing(lines(answer.chunks))
                )
                while True:
                    line = await self._next_line(path, messages, idle)
                    yield stream_result(path, parse_json(path, line))
        except HttpFailure as exc:
            raise _translated(exc) from exc

    async def _stream_head(
        self, stack: contextlib.AsyncExitStack, path: str, body: Json, idle: float | None
    ) -> Streamed:
        try:
            async with asyncio.timeout(idle):
                return await stack.enter_async_context(
                    self._http().stream(path, orjson.dumps(body))
                )
        except TimeoutError:
            raise self._quiet_stream(path, idle) from None

    async def _next_line(
        self, path: str, messages: AsyncIterator[bytes], idle: float | None
    ) -> bytes:
        try:
            async with asyncio.timeout(idle):
                return await anext(messages)
        except StopAsyncIteration:
            raise EtcdUnavailable(f"etcd at {self.url} closed the {path} stream") from None
        except TimeoutError:
            raise self._quiet_stream(path, idle) from None

    def _quiet_stream(self, path: str, idle: float | None) -> WaitTimeout:
        return WaitTimeout(f"no news on {path} from etcd at {self.url} within {idle} s")


def _translated(failure: HttpFailure) -> EtcdError:
    """The client's error for a failure below HTTP."""
    return (EtcdUnavailable if failure.unreachable else EtcdError)(str(failure))
