"""API conformance: each service answers as its own OpenAPI document says.

Schemathesis loads the document from the running app (in-process, lifespan and all, against a
throwaway database) and sends every operation examples, coverage cases (boundaries, missing
and wrong-typed fields, methods the path does not take) and fuzzed cases, positive and
negative, with a fixed seed. Each call carries a service token for the service and the admin
token, so guarded commands and admin routes are exercised past their guards. Every answer
must be no server error (a 5xx other than the documented 503), carry a documented status
code and content type, match the documented body schema, and a 405 must say ``Allow``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from order.app import OrderSettings, order_spec
from ordermesh_shared.bootstrap import ServiceSpec, create_service_app
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.errors import install_error_handlers
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from pydantic import SecretStr
from schemathesis import BaseSchema, Case, HookContext, Response, engine
from schemathesis.engine import events
from schemathesis.engine.recorder import CheckFailureInfo, ScenarioRecorder
from schemathesis.python import asgi
from shipping.app import SPEC as SHIPPING
from shipping.app import ShippingSettings

from tests.support.apps import bearer
from tests.support.fakes import InMemoryRegistry
from tests.support.postgres import create_database, drop_database

pytestmark = pytest.mark.integration

SEED = 20261205
# Fuzzed cases per operation (the examples and coverage phases add their own, bounded ones).
MAX_EXAMPLES = 15
ADMIN_TOKEN = "conformance-admin-token"
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "unsupported_method",
    "allow_header_conformance",
]


@dataclass(frozen=True)
class Service:
    settings: Callable[..., ServiceSettings]
    spec: Callable[[ServiceSettings], ServiceSpec]


def _order_spec(settings: ServiceSettings) -> ServiceSpec:
    assert isinstance(settings, OrderSettings)
    return order_spec(settings)


SERVICES = {
    # No participant is registered: a placed order's saga fails fast and compensates; the POST
    # answers 202 at once instead of waiting for it.
    "order": Service(
        lambda **kw: OrderSettings(order_wait=0, saga_deadline=1, saga_step_timeout=0.5, **kw),
        _order_spec,
    ),
    "inventory": Service(InventorySettings, lambda _s: INVENTORY),
    "payment": Service(PaymentSettings, lambda _s: PAYMENT),
    "shipping": Service(ShippingSettings, lambda _s: SHIPPING),
}


@dataclass
class Outcome:
    """What one run found: operations and cases sent, and every failed check."""

    operations: set[str] = field(default_factory=set)
    cases: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, recorder: ScenarioRecorder) -> None:
        self.operations.add(recorder.label)
        self.cases += len(recorder.cases)
        for interaction in recorder.interactions.values():
            if interaction.response is not None:
                self.statuses[recorder.label, interaction.response.status_code] += 1
        for checks in recorder.checks.values():
            for check in checks:
                if check.failure_info is not None:
                    self.failures.append(_describe(check.failure_info))

    def only_refused(self) -> set[str]:
        """Operations that answered nothing but 401, 403 or 405 (a token not taken, say)."""
        ran = {label for (label, status) in self.statuses if status not in (401, 403, 405)}
        return self.operations - ran

    def report(self, name: str) -> str:
        counts = f"{name}: {len(self.operations)} operations, {self.cases} cases"
        found = sorted(set(self.failures)) + self.errors
        return "\n\n".join([f"{counts}, {len(found)} distinct failures", *found])


def _describe(info: CheckFailureInfo) -> str:
    failure = info.failure
    return f"{failure.operation}: {failure.title}\n{failure.message}\n{info.code_sample}"


@pytest.mark.parametrize("name", list(SERVICES))
# Hypothesis's warnings about how Schemathesis drives it (a large repr, `random` inside a
# strategy) are about the tool, not the services: as errors they would drop the cases.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
def test_every_answer_is_documented(name: str) -> None:
    with _running(name) as schema:
        outcome = _run(schema)
    print(outcome.report(name))
    assert outcome.operations, "Schemathesis tested no operation"
    assert not outcome.errors, outcome.report(name)
    assert not outcome.failures, outcome.report(name)
    # Not a pass by default: every operation got past its guards and ran at least once.
    assert not outcome.only_refused(), outcome.only_refused()


async def test_a_405_names_every_method_the_path_takes() -> None:
    # One route per method: Starlette named only the first route's ("Allow: POST" on /orders,
    # which GET lists too), so a client could not learn what the path takes.
    app = FastAPI()
    install_error_handlers(app)
    app.get("/orders")(_nothing)
    app.post("/orders")(_nothing)
    app.put("/orders/{order_id}")(_nothing)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        refused = await c.delete("/orders")
        other_path = await c.options("/orders/7")
    assert refused.status_code == 405
    assert refused.headers["Allow"] == "GET, POST"
    assert refused.json() == {"detail": "Method Not Allowed"}
    assert other_path.headers["Allow"] == "PUT"


async def _nothing() -> None:
    return None


@contextmanager
def _running(name: str) -> Iterator[BaseSchema]:
    """The OpenAPI document of service ``name`` running on a throwaway database (lifespan
    started by Schemathesis's ASGI client), set up to call it with both tokens."""
    database = f"om_test_{uuid.uuid4().hex[:12]}"
    dsn = asyncio.run(create_database(database))
    try:
        service = SERVICES[name]
        secret = SecretStr(secrets.token_urlsafe(32))
        settings = service.settings(
            database_url=dsn,
            service_token_secret=secret,
            admin_token=SecretStr(ADMIN_TOKEN),
            outbox_relay="off",
        )
        registry = InMemoryRegistry()
        app = create_service_app(
            service.spec(settings), settings, registry_factory=lambda _s: registry
        )
        # Long enough for the whole run (a service token normally lives 60 s).
        headers = bearer(secret, audience=name, ttl=600) | {"X-Admin-Token": ADMIN_TOKEN}
        try:
            schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=_config(headers))
            _wait_ready(app)
            schema.hook("after_call")(_heal_faults)
            yield schema
        finally:
            asgi.shutdown_lifespans()
    finally:
        asyncio.run(drop_database(database))


def _config(headers: dict[str, str]) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": headers,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                "enabled": False,
                **{check: {"enabled": True} for check in CHECKS},
                # A database outage is documented (503 + Retry-After) on every route.
                "not_a_server_error": {
                    "enabled": True,
                    "expected-statuses": ["2xx", "3xx", "4xx", "503"],
                },
            },
        }
    )


def _run(schema: BaseSchema) -> Outcome:
    outcome = Outcome()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            outcome.add(event.recorder)
        elif isinstance(event, events.NonFatalError):
            outcome.errors.append(f"{event.label}: {event.info.title}\n{event.info.message}")
        elif isinstance(event, events.FatalError):
            outcome.errors.append(f"Schemathesis stopped: {event.exception!r}")
    return outcome


def _wait_ready(app: object, within: float = 10.0) -> None:
    """Until /health/ready says 200: migrations applied, so answers are the steady ones."""
    deadline = time.monotonic() + within
    with asgi.get_client(app) as client:  # type: ignore[arg-type]
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.05)


def _heal_faults(_context: HookContext, case: Case[Any], _response: Response) -> None:
    # PUT /admin/faults makes the instance fail, hang or lag on purpose: cleared after every
    # such call, or the injected answers would be taken for the cases that follow.
    if case.method.upper() == "PUT" and case.operation.path == "/admin/faults":
        with asgi.get_client(case.operation.app) as client:
            client.delete("/admin/faults", headers={"X-Admin-Token": ADMIN_TOKEN})
