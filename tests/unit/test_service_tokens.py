"""Service tokens: who may call an internal endpoint, and the client that proves it."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest
from ordermesh_shared.auth import ServiceTokens, TokenRejected
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.resilience import HttpxEngine, ServiceClient, StaticInstances
from pydantic import SecretStr

SECRET = SecretStr("k" * 32)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_token_names_its_caller_to_its_audience_only() -> None:
    token = ServiceTokens(SECRET, service="order").for_audience("payment")
    assert ServiceTokens(SECRET, service="payment").verify(token) == "order"
    with pytest.raises(TokenRejected, match="not for inventory"):
        ServiceTokens(SECRET, service="inventory").verify(token)


def test_an_expired_or_foreign_token_is_rejected() -> None:
    clock = Clock()
    order = ServiceTokens(SECRET, service="order", clock=clock)
    expired = order.issue("payment", now=clock.now - 120, ttl=60)
    with pytest.raises(TokenRejected, match="expired"):
        ServiceTokens(SECRET, service="payment").verify(expired)
    forged = ServiceTokens(SecretStr("x" * 32), service="order").for_audience("payment")
    with pytest.raises(TokenRejected, match="bad signature"):
        ServiceTokens(SECRET, service="payment").verify(forged)
    unsigned = jwt.encode({"sub": "order", "aud": "payment"}, key=None, algorithm="none")
    with pytest.raises(TokenRejected):
        ServiceTokens(SECRET, service="payment").verify(unsigned)


def test_a_verified_token_stops_being_accepted_when_it_expires() -> None:
    clock = Clock()
    payment = ServiceTokens(SECRET, service="payment", clock=clock)
    token = ServiceTokens(SECRET, service="order", clock=clock).for_audience("payment")
    assert payment.verify(token) == "order"  # now cached
    clock.now += 120
    with pytest.raises(TokenRejected, match="expired"):
        payment.verify(token)


def test_the_caller_signs_once_per_audience_and_refreshes_before_expiry() -> None:
    clock = Clock()
    order = ServiceTokens(SECRET, service="order", clock=clock)
    first = order.for_audience("payment")
    clock.now += 30
    assert order.for_audience("payment") == first  # cached: no signature per call
    assert order.for_audience("inventory") != first
    clock.now += 20  # 10 s left: too close to expiry to send
    renewed = order.for_audience("payment")
    assert renewed != first
    assert ServiceTokens(SECRET, service="payment", clock=clock).verify(renewed) == "order"


async def test_the_service_client_sends_its_token_for_the_target() -> None:
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization", ""))
        return httpx.Response(200)

    found = StaticInstances({"payment": [ServiceInstance("payment", "p-1", "10.0.0.9", 1)]})
    engine = HttpxEngine(transport=httpx.MockTransport(record))
    tokens = ServiceTokens(SECRET, service="order")
    async with ServiceClient(found, engine=engine, tokens=tokens) as clients:
        await clients.payment.post("/payments", json={}, idempotency_key="k")
        await clients.payment.get("/customers")
    scheme, _, token = seen[0].partition(" ")
    assert scheme == "Bearer"
    assert ServiceTokens(SECRET, service="payment").verify(token) == "order"
    assert seen[1] == seen[0]
