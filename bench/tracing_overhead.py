"""Tracing's cost per request: instrumentation installed but off, and tracing on.

An in-process FastAPI app (a JSON route with a validated body, shaped like a participant's
command route, no database) is called straight through ASGI, many times in a row, in three
variants:

* ``bare``: no instrumentation (what a service runs with tracing off: the bootstrap installs
  nothing unless an exporter is configured);
* ``installed_off``: the FastAPI instrumentation installed with no tracer provider set (the
  OpenTelemetry API's no-op), i.e. what "installed but disabled" would cost;
* ``on``: our :class:`~ordermesh_shared.tracing.Tracing` with a batch processor and an
  exporter that drops the spans (the cost of recording and handing them over, not of the
  network).

Variants run interleaved, ``--rounds`` times, each ``--requests`` calls; the CPU time per
request (``time.process_time``) of each round is kept, and the report gives the median, the
spread of the rounds (the noise) and each variant's ratio to ``bare``. The saga engine's own
spans cost nothing when tracing is off (:func:`ordermesh_shared.tracing.step_span` returns
at once); ``helpers_off`` times one such call.

    uv run python bench/tracing_overhead.py                  # table + bench/results/tracing.json
    uv run python bench/tracing_overhead.py --requests 3000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from ordermesh_shared.tracing import Tracing, step_span
from pydantic import BaseModel, ConfigDict

RESULTS = Path(__file__).resolve().parent / "results" / "tracing.json"
BODY = b'{"order_id": "7b1f3c2e-0000-4000-8000-000000000001", "amount": "89.00"}'

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Charge(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_id: str
    amount: str


class Discard(SpanExporter):
    """Takes every span and drops it."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def make_app() -> FastAPI:
    app = FastAPI()

    @app.post("/payments", status_code=201)
    async def charge(body: Charge) -> dict[str, str]:
        return {"order_id": body.order_id, "status": "charged"}

    return app


async def call(app: Any) -> int:
    """One POST through ASGI, as uvicorn would make it; the status answered."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/payments",
        "raw_path": b"/payments",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"bench")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8002),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def cpu_per_request(app: Any, requests: int) -> float:
    """Microseconds of CPU per request over ``requests`` calls."""
    started = time.process_time()
    for _ in range(requests):
        if await call(app) != 201:
            raise RuntimeError("the bench app did not answer 201")
    return (time.process_time() - started) / requests * 1e6


def helpers_off_cost(calls: int = 100_000) -> float:
    """Microseconds per ``step_span`` entered and left while tracing is off."""
    started = time.process_time()
    for _ in range(calls):
        with step_span("place_order", "reserve_stock", "forward"):
            pass
    return (time.process_time() - started) / calls * 1e6


async def measure(requests: int, rounds: int) -> dict[str, list[float]]:
    bare = make_app()
    installed = make_app()
    FastAPIInstrumentor.instrument_app(installed)  # no provider set: the API's no-op
    traced = make_app()
    tracing = Tracing(service="bench", instance_id="bench-1", exporter=Discard())
    tracing.instrument_app(traced)
    variants = {"bare": bare, "installed_off": installed, "on": traced}
    figures: dict[str, list[float]] = {name: [] for name in variants}
    helpers = helpers_off_cost()  # before tracing starts: the helpers as a service has them
    # Started for the whole run (a stopped provider cannot start again); it touches only
    # the "on" app's spans: the others record nothing.
    async with tracing:
        for app in variants.values():  # warm: routes compiled, middleware stacks built
            await cpu_per_request(app, 200)
        for _ in range(rounds):
            for name, app in variants.items():
                figures[name].append(await cpu_per_request(app, requests))
    figures["helpers_off"] = [helpers]
    return figures


def report(figures: dict[str, list[float]]) -> dict[str, Any]:
    bare = statistics.median(figures["bare"])
    rows = {}
    for name, values in figures.items():
        median = statistics.median(values)
        rows[name] = {
            "median_us": round(median, 2),
            "spread_us": round(max(values) - min(values), 2),
            "rounds_us": [round(v, 2) for v in values],
            "ratio_to_bare": round(median / bare, 3) if name != "helpers_off" else None,
        }
    noise = (max(figures["bare"]) - min(figures["bare"])) / bare
    rows["noise"] = {"bare_spread_ratio": round(noise, 3)}
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.requests, args.rounds))
    rows = report(figures)
    for name, row in rows.items():
        print(f"{name:>14}: {json.dumps(row)}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
