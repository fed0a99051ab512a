"""Which failures ServiceClient retries, where, how long it waits, and what the caller sees.

No network: the client runs over httpx's MockTransport, whose handler plays the instances.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import httpx
import pytest
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.resilience import (
    CircuitOpen,
    ClientPolicy,
    DeadlineExceeded,
    HttpxEngine,
    ServiceClient,
    StaticInstances,
    UpstreamRejected,
    UpstreamUnavailable,
    deadline_scope,
)
from ordermesh_shared.resilience.retry import parse_retry_after
from structlog.testing import capture_logs

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Upstream:
    """Instances played by one handler; remembers each request and when it arrived."""

    handler: Handler
    seen: list[tuple[float, httpx.Request]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((time.monotonic(), request))
        return self.handler(request)

    def hosts(self) -> list[str]:
        return [f"{r.url.host}:{r.url.port}" for _, r in self.seen]

    def gaps(self) -> list[float]:
        times = [t for t, _ in self.seen]
        return [b - a for a, b in itertools.pairwise(times)]


def instances(count: int) -> StaticInstances:
    found = [ServiceInstance("pay", f"pay-{n}", "10.0.0.1", 9000 + n) for n in range(count)]
    return StaticInstances({"pay": found})


def fast_policy(**changes: object) -> ClientPolicy:
    base: dict[str, object] = {
        "max_attempts": 4,
        "backoff": 0.01,
        "backoff_cap": 0.04,
        "breaker_failures": 1000,
        "budget_min_retries": 1000,
    }
    base.update(changes)
    return ClientPolicy(**base)  # type: ignore[arg-type]


def client_over(
    upstream: Upstream, *, count: int = 1, policy: ClientPolicy | None = None
) -> ServiceClient:
    engine = HttpxEngine(transport=httpx.MockTransport(upstream))
    return ServiceClient(instances(count), policy=policy or fast_policy(), engine=engine)


def always(status: int, headers: dict[str, str] | None = None) -> Handler:
    return lambda _request: httpx.Response(status, json={"detail": "nope"}, headers=headers)


def statuses(*codes: int, headers: dict[str, str] | None = None) -> Handler:
    remaining = list(codes)
    return lambda _request: httpx.Response(remaining.pop(0), json={}, headers=headers)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_4xx_is_an_answer_never_retried(status: int) -> None:
    upstream = Upstream(always(status))
    async with client_over(upstream) as clients:
        with pytest.raises(UpstreamRejected) as caught:
            await clients.pay.get("/thing")
    assert len(upstream.seen) == 1
    assert caught.value.status == status
    assert caught.value.body == {"detail": "nope"}


async def test_accepted_4xx_comes_back_as_a_response() -> None:
    upstream = Upstream(always(404))
    async with client_over(upstream) as clients:
        answer = await clients.pay.get("/thing", accept=(404,))
    assert answer.status == 404
    assert answer.json() == {"detail": "nope"}


async def test_503_is_retried_up_to_the_limit_with_growing_jittered_waits() -> None:
    random.seed(7)  # tenacity's jitter draws from the global generator
    waits: list[list[float]] = []
    upstream = Upstream(always(503))
    async with client_over(upstream, policy=fast_policy(max_attempts=4)) as clients:
        for _ in range(30):
            with capture_logs() as logs, pytest.raises(UpstreamUnavailable) as caught:
                await clients.pay.get("/thing")
            assert caught.value.status == 503
            waits.append([e["wait"] for e in logs if e["event"] == "client.retry"])
    assert len(upstream.seen) == 30 * 4
    # Full jitter: retry n (from 0) waits uniformly in [0, min(cap, base * 2^n)]...
    for per_call in waits:
        assert len(per_call) == 3
        for n, wait in enumerate(per_call):
            assert 0 <= wait <= min(0.04, 0.01 * 2**n) + 1e-4
    # ...so the waits are spread out, and later retries wait longer on average.
    first, third = [w[0] for w in waits], [w[2] for w in waits]
    assert min(first) < 0.0025 < 0.0075 < max(first)  # spread over [0, 0.01], not clustered
    assert sum(third) / len(third) > 1.5 * sum(first) / len(first)
    # The client really waited what it said (never less).
    assert all(gap >= 0 for gap in upstream.gaps())


async def test_retry_after_is_honoured() -> None:
    upstream = Upstream(statuses(429, 200, headers={"Retry-After": "1"}))
    async with client_over(upstream) as clients:
        answer = await clients.pay.get("/thing")
    assert answer.status == 200
    (gap,) = upstream.gaps()
    assert 0.95 <= gap < 1.5


async def test_retry_after_beyond_the_deadline_fails_at_once() -> None:
    upstream = Upstream(always(429, headers={"Retry-After": "30"}))
    started = time.monotonic()
    async with client_over(upstream) as clients:
        with pytest.raises(UpstreamUnavailable) as caught:
            await clients.pay.get("/thing", timeout=2.0)
    assert caught.value.status == 429
    assert len(upstream.seen) == 1
    assert time.monotonic() - started < 1.0


async def test_retry_after_on_503_is_honoured_too() -> None:
    upstream = Upstream(statuses(503, 200, headers={"Retry-After": "0.3"}))
    async with client_over(upstream) as clients:
        await clients.pay.get("/thing")
    (gap,) = upstream.gaps()
    assert gap >= 0.29


def test_retry_after_parses_seconds_and_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


async def test_post_without_idempotency_key_is_not_resent() -> None:
    upstream = Upstream(always(503))
    async with client_over(upstream) as clients:
        with pytest.raises(UpstreamUnavailable):
            await clients.pay.post("/payments", json={"amount": "1.00"})
    assert len(upstream.seen) == 1


async def test_post_with_idempotency_key_is_resent_with_the_key() -> None:
    upstream = Upstream(statuses(503, 502, 201))
    async with client_over(upstream) as clients:
        answer = await clients.pay.post("/payments", json={"a": 1}, idempotency_key="o-1:charge")
    assert answer.status == 201
    assert [r.headers["Idempotency-Key"] for _, r in upstream.seen] == ["o-1:charge"] * 3
    assert all(r.content == b'{"a":1}' for _, r in upstream.seen)


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_other_writes_follow_the_same_rule(method: str) -> None:
    upstream = Upstream(always(503))
    async with client_over(upstream) as clients:
        with pytest.raises(UpstreamUnavailable):
            await clients.pay.request(method, "/thing")
        with pytest.raises(UpstreamUnavailable):
            await clients.pay.request(method, "/thing", idempotency_key="k")
    assert len(upstream.seen) == 1 + 4


async def test_an_unsent_post_is_resent_elsewhere_even_without_a_key() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.port == 9000:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(201, json={})

    upstream = Upstream(handler)
    async with client_over(upstream, count=2) as clients:
        for _ in range(4):
            assert (await clients.pay.post("/payments", json={})).status == 201


async def test_a_post_whose_connection_broke_after_sending_is_not_resent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    upstream = Upstream(handler)
    async with client_over(upstream, count=2) as clients:
        with pytest.raises(UpstreamUnavailable):
            await clients.pay.post("/payments", json={})
    assert len(upstream.seen) == 1


async def test_500_counts_as_unavailable_but_is_not_retried() -> None:
    upstream = Upstream(always(500))
    async with client_over(upstream) as clients:
        with pytest.raises(UpstreamUnavailable) as caught:
            await clients.pay.get("/thing")
    assert caught.value.status == 500
    assert len(upstream.seen) == 1


async def test_a_retry_goes_to_another_instance() -> None:
    upstream = Upstream(lambda r: httpx.Response(503 if r.url.port == 9000 else 200))
    async with client_over(upstream, count=3, policy=fast_policy(max_attempts=2)) as clients:
        for _ in range(30):
            await clients.pay.get("/thing")
    hosts = upstream.hosts()
    # Whenever the sick instance was tried, the very next attempt went to a healthy one.
    for before, after in itertools.pairwise(hosts):
        if before.endswith(":9000"):
            assert not after.endswith(":9000")
    assert hosts.count("10.0.0.1:9000") >= 5  # it kept getting its share of first attempts


async def test_deadline_travels_and_bounds_the_attempts() -> None:
    upstream = Upstream(always(200))
    async with client_over(upstream) as clients:
        with deadline_scope(0.5):
            await clients.pay.get("/thing")
        await clients.pay.get("/thing", timeout=0.2)
        await clients.pay.get("/thing")
    budgets = [int(r.headers["X-Deadline-Ms"]) for _, r in upstream.seen]
    assert 300 < budgets[0] <= 500
    assert 100 < budgets[1] <= 200
    assert budgets[2] == 3000  # the attempt timeout, inside the default 10 s deadline


async def test_a_passed_inherited_deadline_fails_without_sending() -> None:
    upstream = Upstream(always(200))
    async with client_over(upstream) as clients:
        with deadline_scope(0.0), pytest.raises(DeadlineExceeded):
            await clients.pay.get("/thing")
    assert upstream.seen == []


async def test_no_instance_is_unavailable_not_open() -> None:
    upstream = Upstream(always(200))
    async with client_over(upstream, count=0) as clients:
        with pytest.raises(UpstreamUnavailable) as caught:
            await clients.pay.get("/thing")
    assert not isinstance(caught.value, CircuitOpen)
    assert "no instance" in str(caught.value)


async def test_json_bodies_keep_decimals_exact() -> None:
    upstream = Upstream(always(200))
    async with client_over(upstream) as clients:
        await clients.pay.post("/payments", json={"amount": Decimal("10.10")})
    ((_, request),) = upstream.seen
    assert request.content == b'{"amount":"10.10"}'
    assert request.headers["Content-Type"] == "application/json"
