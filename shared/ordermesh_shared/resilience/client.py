"""ServiceClient: every call between services, by service name, resilient and cheap.

A call resolves the service's instances from the registry's local cache, picks one (least
outstanding or round robin, never one whose breaker is open while another admits calls),
sends through that instance's breaker with a per-attempt timeout inside the call's deadline,
and retries what is safe to retry, elsewhere when possible, within the target's retry budget.
Failures surface as :mod:`ordermesh_shared.resilience.errors`, never as engine exceptions.

With ``tokens`` (see :class:`ordermesh_shared.auth.ServiceTokens`) every call carries this
service's token for the target (``Authorization: Bearer``), signed once and reused until
shortly before it expires; callers never build that header themselves.

Statuses: 2xx and 3xx come back as :class:`UpstreamResponse`; a 4xx raises
:class:`UpstreamRejected` unless listed in ``accept`` (e.g. ``accept=(404,)`` for a lookup
where "not found" is an answer); a 5xx raises :class:`UpstreamUnavailable` once the retries
allowed are spent.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Protocol, Self, TypedDict, Unpack
from urllib.parse import urlencode

import orjson
import structlog
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState

from ordermesh_shared.discovery import RegistryError, ServiceInstance
from ordermesh_shared.resilience.balancer import Balancer, Endpoint, NoUsableInstance, Strategy
from ordermesh_shared.resilience.breaker import BreakerRejected, InstanceBreaker
from ordermesh_shared.resilience.budget import RetryBudget
from ordermesh_shared.resilience.client_metrics import ClientMetrics, TargetMetrics
from ordermesh_shared.resilience.deadline import DEADLINE_HEADER, current_deadline, header_value
from ordermesh_shared.resilience.errors import (
    CircuitOpen,
    DeadlineExceeded,
    RetryBudgetExhausted,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    decode_body,
)
from ordermesh_shared.resilience.retry import (
    RETRYABLE_STATUSES,
    SAFE_METHODS,
    AttemptFailed,
    RetrySchedule,
    parse_retry_after,
)
from ordermesh_shared.resilience.transport import (
    AiohttpEngine,
    Engine,
    EngineError,
    UpstreamResponse,
)

log = structlog.get_logger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
AUTHORIZATION_HEADER = "Authorization"
_JSON_HEADERS = {"Content-Type": "application/json"}


BreakerChange = Callable[[str, str, str, str], None]
"""``(target, instance_id, old_state, new_state)``."""


class TokenSource(Protocol):
    """What the client needs to authenticate: a bearer token for a target service."""

    def for_audience(self, audience: str) -> str: ...


class InstanceSource(Protocol):
    """What the client needs of a registry: a watch, then local cache reads."""

    async def watch(self, service: str) -> None: ...

    def instances(self, service: str) -> Sequence[ServiceInstance]: ...


class RequestOptions(TypedDict, total=False):
    """The keyword arguments of every call (see :meth:`TargetService.request`)."""

    json: Any
    content: bytes | None
    params: Mapping[str, str | int] | None
    headers: Mapping[str, str] | None
    idempotency_key: str | None
    timeout: float | None
    accept: Collection[int]


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """Every knob of the client, with defaults for calls between our services."""

    timeout: float = 10.0
    """Deadline of a whole call (attempts and waits) when no shorter one is inherited."""
    attempt_timeout: float = 3.0
    """Longest wait for one attempt (bounded by what is left of the deadline)."""
    max_attempts: int = 3
    backoff: float = 0.05
    """The first retry waits up to this; the ceiling doubles per retry (full jitter)."""
    backoff_cap: float = 1.0
    breaker_failures: int = 5
    """Consecutive failures of one instance that open its breaker."""
    breaker_reset: float = 5.0
    """Seconds an open breaker waits before admitting one trial call."""
    budget_ratio: float = 0.2
    budget_window: float = 10.0
    budget_min_retries: int = 3
    balancing: Strategy = "least_outstanding"
    pool_size: int = 100
    """Most connections the default engine keeps open, all targets together."""

    @property
    def schedule(self) -> RetrySchedule:
        return RetrySchedule(self.max_attempts, self.backoff, self.backoff_cap)


class ServiceClient:
    """Calls other services by name; one per process, opened by the lifespan.

    >>> async with ServiceClient(registry, metrics=metrics.registry) as clients:
    ...     answer = await clients.payment.post("/payments", json=charge, idempotency_key=key)
    ...     customer = (await clients.service("payment").get("/customers/alice")).json()

    ``metrics`` is the Prometheus registry to add the client's metrics to (a private one if
    None); ``engine`` replaces the default aiohttp engine (see
    :mod:`ordermesh_shared.resilience.transport`); ``on_breaker_change(target, instance, old,
    new)`` is told of every breaker state change (they are also logged and exported);
    ``tokens`` signs the service token sent with every call (none sent without it).
    """

    def __init__(
        self,
        registry: InstanceSource,
        *,
        metrics: CollectorRegistry | None = None,
        policy: ClientPolicy | None = None,
        engine: Engine | None = None,
        on_breaker_change: BreakerChange | None = None,
        tokens: TokenSource | None = None,
    ) -> None:
        self.policy = policy or ClientPolicy()
        self._on_breaker_change = on_breaker_change
        self._tokens = tokens
        self._registry = registry
        self._metrics = ClientMetrics(metrics or CollectorRegistry(auto_describe=True))
        self._engine: Engine = engine or AiohttpEngine(pool_size=self.policy.pool_size)
        self._targets: dict[str, TargetService] = {}

    async def __aenter__(self) -> Self:
        await self._engine.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._engine.__aexit__(exc_type, exc, tb)

    def service(self, name: str) -> TargetService:
        """The handle for calls to ``name`` (created on first use, then reused)."""
        target = self._targets.get(name)
        if target is None:
            target = TargetService(
                name,
                registry=self._registry,
                engine=self._engine,
                policy=self.policy,
                metrics=self._metrics.for_target(name),
                on_breaker_change=self._on_breaker_change,
                tokens=self._tokens,
            )
            self._targets[name] = target
        return target

    def __getattr__(self, name: str) -> TargetService:
        # ``clients.payment`` reads like the call it makes; private names stay errors.
        if name.startswith("_"):
            raise AttributeError(name)
        return self.service(name)


class TargetService:
    """Calls to one service: its balancer, breakers and retry budget.

    >>> payment = clients.service("payment")
    >>> answer = await payment.get("/customers/alice", accept=(404,))
    >>> payment.breaker_states()       # {"payment-1": "closed", ...}
    """

    def __init__(
        self,
        name: str,
        *,
        registry: InstanceSource,
        engine: Engine,
        policy: ClientPolicy,
        metrics: TargetMetrics,
        on_breaker_change: BreakerChange | None = None,
        tokens: TokenSource | None = None,
    ) -> None:
        self.name = name
        self._on_breaker_change = on_breaker_change
        self._tokens = tokens
        self._registry = registry
        self._engine = engine
        self._policy = policy
        self._schedule = policy.schedule
        self._metrics = metrics
        self._watched = False
        self.budget = RetryBudget(
            ratio=policy.budget_ratio,
            window=policy.budget_window,
            min_retries=policy.budget_min_retries,
        )
        self._balancer = Balancer(
            self._new_breaker, strategy=policy.balancing, on_drop=self._forget_endpoint
        )

    # The verbs hand back request()'s coroutine rather than awaiting it: one frame less for
    # every resume of every call.
    def get(
        self,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        accept: Collection[int] = (),
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """GET ``path`` (retried freely: reads are safe)."""
        return self.request(
            "GET", path, params=params, headers=headers, timeout=timeout, accept=accept
        )

    def post(
        self, path: str, **options: Unpack[RequestOptions]
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """POST ``path``; resent only with ``idempotency_key`` (see :meth:`request`)."""
        return self.request("POST", path, **options)

    def put(
        self, path: str, **options: Unpack[RequestOptions]
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """PUT ``path`` (see :meth:`request`)."""
        return self.request("PUT", path, **options)

    def patch(
        self, path: str, **options: Unpack[RequestOptions]
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """PATCH ``path`` (see :meth:`request`)."""
        return self.request("PATCH", path, **options)

    def delete(
        self, path: str, **options: Unpack[RequestOptions]
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """DELETE ``path`` (see :meth:`request`)."""
        return self.request("DELETE", path, **options)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        # Not asyncio.timeout: this deadline travels to the callee and bounds every attempt.
        timeout: float | None = None,  # noqa: ASYNC109
        accept: Collection[int] = (),
    ) -> UpstreamResponse:
        """Call ``method path`` on some instance of the service.

        ``json`` (a JSON-able value or pydantic model) or ``content`` is the body;
        ``idempotency_key`` is sent as ``Idempotency-Key`` and makes a state-changing request
        safe to resend; ``timeout`` shortens the deadline (never extends an inherited one);
        ``accept`` lists 4xx statuses to return instead of raising UpstreamRejected.
        """
        call = self._new_call(method, path, json, content, params, headers, idempotency_key)
        call.deadline = _deadline(timeout if timeout is not None else self._policy.timeout)
        call.accept = accept
        if not self._watched:
            await self._watch()
        self.budget.record_request()
        started = time.perf_counter()
        try:
            try:
                answer = await self._attempt(call)
            except AttemptFailed as failed:
                if not failed.retryable:
                    raise
                answer = await self._retry(call, failed)
        except AttemptFailed as failed:
            error = self._final_error(call, failed)
            self._metrics.outcomes[_outcome(error)].inc()
            raise error from failed.__cause__
        finally:
            self._metrics.latency.observe(time.perf_counter() - started)
        self._metrics.outcomes["ok"].inc()
        return answer

    async def _retry(self, call: _Call, first: AttemptFailed) -> UpstreamResponse:
        # Most calls succeed at once, so the first attempt runs outside tenacity, whose
        # per-run bookkeeping costs a good part of a raw aiohttp call's CPU. A retryable
        # failure hands over to tenacity, which sees that failure as its own first attempt.
        answer: UpstreamResponse = await self._retrying(call)(_Replay(first, self._attempt), call)
        return answer

    def breaker_states(self) -> dict[str, str]:
        """Breaker state by instance id, for the instances currently known."""
        return {e.instance.instance_id: e.breaker.state for e in self._balancer.endpoints}

    # -- one call -------------------------------------------------------------------------

    def _new_call(
        self,
        method: str,
        path: str,
        json: Any,
        content: bytes | None,
        params: Mapping[str, str | int] | None,
        headers: Mapping[str, str] | None,
        idempotency_key: str | None,
    ) -> _Call:
        method = method.upper()
        sent_headers = dict(headers) if headers else {}
        if json is not None:
            content = orjson.dumps(json, default=_json_default)
            sent_headers.update(_JSON_HEADERS)
        if idempotency_key is not None:
            sent_headers[IDEMPOTENCY_HEADER] = idempotency_key
        target = f"{path}?{urlencode(params)}" if params else path
        resendable = method in SAFE_METHODS or idempotency_key is not None
        return _Call(method, target, content, sent_headers, resendable=resendable)

    def _retrying(self, call: _Call) -> AsyncRetrying:
        def out_of_budget(_state: RetryCallState) -> bool:
            if self.budget.can_retry():
                return False
            call.budget_refused = True
            self._metrics.budget_exhausted.inc()
            return True

        def before_retry(state: RetryCallState) -> None:
            self.budget.record_retry()
            self._metrics.retries.inc()
            log.info(
                "client.retry",
                target=self.name,
                attempt=state.attempt_number + 1,
                wait=round(state.upcoming_sleep, 4),
                reason=call.last_error.detail if call.last_error else None,
            )

        return self._schedule.retrying(
            time_left=call.time_left, out_of_budget=out_of_budget, before_retry=before_retry
        )

    async def _attempt(self, call: _Call) -> UpstreamResponse:
        seconds = min(self._policy.attempt_timeout, call.deadline - time.monotonic())
        if seconds <= 0:
            raise call.failed(self._deadline_error(call), retryable=False)
        endpoint = self._pick(call)
        headers = {**call.headers, DEADLINE_HEADER: header_value(seconds)}
        if self._tokens is not None:
            # Per attempt (the token is cached): a late retry never carries an expired one.
            headers[AUTHORIZATION_HEADER] = f"Bearer {self._tokens.for_audience(self.name)}"
        endpoint.outstanding += 1
        try:
            with endpoint.breaker.guard():
                answer = await self._engine.send(
                    call.method,
                    endpoint.base_url + call.target,
                    headers=headers,
                    body=call.content,
                    time_limit=seconds,
                )
                if answer.status >= 500:
                    raise _ServerFault(answer)  # inside the guard: the breaker counts it
        except (BreakerRejected, _ServerFault, EngineError) as exc:
            cause = exc if isinstance(exc, EngineError) else None  # ours are not worth showing
            raise self._failure(call, endpoint, exc, seconds) from cause
        finally:
            endpoint.outstanding -= 1
        if answer.status < 400:
            return answer
        return self._not_ok(call, answer)

    def _pick(self, call: _Call) -> Endpoint:
        try:
            endpoint = self._balancer.pick(self._registry.instances(self.name), tried=call.tried)
        except NoUsableInstance as none:
            if call.last_error is not None:  # a retry found nowhere to go: report the failure
                raise call.failed(call.last_error, retryable=False) from None
            raise call.failed(self._nowhere(none), retryable=False) from None
        call.tried.append(endpoint)
        return endpoint

    def _failure(
        self, call: _Call, endpoint: Endpoint, exc: Exception, seconds: float
    ) -> AttemptFailed:
        """What an attempt's failure means: the error, and whether to try again."""
        where = endpoint.instance.instance_id
        if isinstance(exc, BreakerRejected):
            # Lost a race for the half-open trial: nothing was sent, another pick may work.
            return call.failed(CircuitOpen(self.name, f"breaker open for {where}"), True)
        if isinstance(exc, _ServerFault):
            return self._server_fault(call, exc.answer, where)
        assert isinstance(exc, EngineError)
        if exc.timed_out:
            return self._timed_out(call, seconds, where)
        error = UpstreamUnavailable(self.name, f"{where}: {exc}")
        return call.failed(error, not exc.sent or call.resendable)

    def _not_ok(self, call: _Call, raw: UpstreamResponse) -> UpstreamResponse:
        """A 4xx: handed back when accepted, else a failure (429: retryable)."""
        status = raw.status
        if status in call.accept:
            return raw
        body = decode_body(raw.content)
        if status == 429:
            error = UpstreamUnavailable(self.name, "too many requests (429)", status=429)
            retry_after = parse_retry_after(raw.headers.get("Retry-After"))
            raise call.failed(error, call.resendable, retry_after=retry_after)
        raise call.failed(UpstreamRejected(self.name, status, body), retryable=False)

    def _server_fault(self, call: _Call, raw: UpstreamResponse, where: str) -> AttemptFailed:
        detail = f"{where} answered {raw.status}: {decode_body(raw.content)}"
        error = UpstreamUnavailable(self.name, detail, status=raw.status)
        retryable = raw.status in RETRYABLE_STATUSES and call.resendable
        return call.failed(error, retryable, retry_after=_retry_after(raw))

    def _timed_out(self, call: _Call, seconds: float, where: str) -> AttemptFailed:
        if call.time_left() < 0.001:
            return call.failed(self._deadline_error(call), retryable=False)
        error = UpstreamUnavailable(self.name, f"{where}: no answer within {seconds:.3f} s")
        return call.failed(error, call.resendable)

    def _deadline_error(self, call: _Call) -> DeadlineExceeded:
        return DeadlineExceeded(self.name, f"deadline passed ({call.method} {call.target})")

    def _nowhere(self, none: NoUsableInstance) -> UpstreamUnavailable:
        if none.known == 0:
            return UpstreamUnavailable(self.name, "no instance registered")
        return CircuitOpen(self.name, f"all {none.known} instance(s) have their breaker open")

    def _final_error(self, call: _Call, failed: AttemptFailed) -> UpstreamError:
        if call.budget_refused and isinstance(failed.error, UpstreamUnavailable):
            return RetryBudgetExhausted(
                self.name, f"{failed.error.detail}; retry budget spent", status=failed.error.status
            )
        return failed.error

    # -- instances ------------------------------------------------------------------------

    async def _watch(self) -> None:
        try:
            await self._registry.watch(self.name)
        except RegistryError as exc:
            raise UpstreamUnavailable(self.name, f"registry unreachable: {exc}") from exc
        self._watched = True

    def _new_breaker(self, instance: ServiceInstance) -> InstanceBreaker:
        breaker = InstanceBreaker(
            instance.instance_id,
            failures=self._policy.breaker_failures,
            reset_timeout=self._policy.breaker_reset,
            on_change=self._breaker_changed,
        )
        self._metrics.breaker(instance.instance_id, breaker.state)
        return breaker

    def _breaker_changed(self, breaker: InstanceBreaker, old: str, new: str) -> None:
        self._metrics.breaker(breaker.name, new)
        logger = log.warning if new == "open" else log.info
        logger("client.breaker", target=self.name, instance=breaker.name, old=old, new=new)
        if self._on_breaker_change is not None:
            self._on_breaker_change(self.name, breaker.name, old, new)

    def _forget_endpoint(self, endpoint: Endpoint) -> None:
        self._metrics.forget(endpoint.instance.instance_id)


class _Call:
    """What one call carries across its attempts."""

    __slots__ = (
        "accept",
        "budget_refused",
        "content",
        "deadline",
        "headers",
        "last_error",
        "method",
        "resendable",
        "target",
        "tried",
    )

    def __init__(
        self,
        method: str,
        target: str,
        content: bytes | None,
        headers: dict[str, str],
        *,
        resendable: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.content = content
        self.headers = headers
        self.resendable = resendable
        self.deadline = 0.0
        self.accept: Collection[int] = ()
        self.tried: list[Endpoint] = []
        self.last_error: UpstreamError | None = None
        self.budget_refused = False

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def failed(
        self, error: UpstreamError, retryable: bool, *, retry_after: float | None = None
    ) -> AttemptFailed:
        self.last_error = error
        return AttemptFailed(error, retryable=retryable, retry_after=retry_after)


class _Replay:
    """An attempt function whose first run re-raises a failure that already happened."""

    def __init__(
        self, first: AttemptFailed, attempt: Callable[[_Call], Awaitable[UpstreamResponse]]
    ) -> None:
        self._first: AttemptFailed | None = first
        self._attempt = attempt

    async def __call__(self, call: _Call) -> UpstreamResponse:
        if self._first is not None:
            first, self._first = self._first, None
            raise first
        return await self._attempt(call)


class _ServerFault(Exception):
    """A 5xx answer, raised inside the breaker's guard so that it counts as a failure."""

    def __init__(self, answer: UpstreamResponse) -> None:
        super().__init__(answer.status)
        self.answer = answer


def _deadline(timeout: float) -> float:
    own = time.monotonic() + timeout
    inherited = current_deadline()
    return own if inherited is None else min(own, inherited)


def _retry_after(raw: UpstreamResponse) -> float | None:
    return parse_retry_after(raw.headers.get("Retry-After")) if raw.status == 503 else None


def _json_default(value: Any) -> Any:
    # Money is Decimal: sent as a string, never as a float that loses cents.
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


def _outcome(error: UpstreamError) -> str:
    if isinstance(error, UpstreamRejected):
        return "rejected"
    if isinstance(error, CircuitOpen):
        return "circuit_open"
    if isinstance(error, RetryBudgetExhausted):
        return "budget_exhausted"
    if isinstance(error, DeadlineExceeded):
        return "deadline"
    return "unavailable"
