"""The overview page followed through a scenario, in Debian's headless Chromium, reading what a
person reads (the rendered text): payment's instance answers 503 to everything and its breaker
shows open, with the order caught in it in flight; healed, the breaker shows closed again; an
order whose shipment is refused shows its compensations, refund before release (the reverse of
the forward steps); an order whose release is refused shows parked, with its retry link.

``ORDERMESH_SCREENSHOTS=docs/screenshots`` saves a PNG of the page at each of those moments
(1280x900; the README shows one).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from ordermesh_shared.faults import Faults, FaultSpec

from tests.support.browser import MISSING, Browser, chromium_path
from tests.support.etcd import EtcdServer, free_port
from tests.support.overview import ADMIN_TOKEN, ScriptedParticipants, overview_app, serving_http

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(chromium_path() is None, reason=MISSING),
]

SCREENSHOTS = "ORDERMESH_SCREENSHOTS"  # a directory: save the page's screenshots there
VIEWPORT = {"width": 1280, "height": 900}
FAR_AWAY = "faraway"  # the customer whose shipment is refused
PAYMENT_BREAKER = "document.querySelector('[data-breaker=\"payment/payment-1\"]')"


class FlakyParticipants(ScriptedParticipants):
    """ScriptedParticipants whose payment instance applies ``payment_faults`` (the fault
    injection the real services use) and whose shipping refuses FAR_AWAY's shipments."""

    def __init__(self) -> None:
        super().__init__()
        self.payment_faults = Faults()
        self.far_away: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        if request.path.startswith("/payments") and self.payment_faults.draw_error():
            status = self.payment_faults.spec.error_status
            return web.json_response({"detail": "injected fault"}, status=status)
        if request.path == "/payments":
            body = await request.json()
            if body["customer_id"] == FAR_AWAY:
                self.far_away.add(body["order_id"])
        if request.path == "/shipments" and (await request.json())["order_id"] in self.far_away:
            return self._refuse(request, 422, "destination_unreachable", "no carrier goes there")
        return await super().handle(request)


def card(order_id: str, where: str) -> str:
    return f"document.querySelector('#{where} [data-saga-id=\"{order_id}\"]')"


async def breaker_text(browser: Browser) -> str:
    """The payment breaker's row as shown: 'payment payment-1 <state>'."""
    text: str = await browser.evaluate(f"{PAYMENT_BREAKER}.innerText")
    return " ".join(text.split())


async def step_lines(browser: Browser, saga: str) -> list[str]:
    """A saga card's timeline, one shown line per step, in the order the page lists them."""
    lines: list[str] = await browser.evaluate(
        f"[...{saga}.querySelectorAll('.step')].map(s => s.innerText)"
    )
    return [" ".join(line.split()) for line in lines]


async def log_in(browser: Browser, base: str) -> None:
    await browser.call(
        "Emulation.setDeviceMetricsOverride", deviceScaleFactor=1, mobile=False, **VIEWPORT
    )
    await browser.open(f"{base}/ui")
    await browser.wait_for("!document.getElementById('login').hidden")
    await browser.evaluate(
        f"document.getElementById('token').value = {json.dumps(ADMIN_TOKEN)};"
        " document.getElementById('login').requestSubmit()"
    )
    await browser.wait_for("!document.getElementById('overview').hidden")


async def screenshot(browser: Browser, name: str, *, top: str) -> None:
    """With ORDERMESH_SCREENSHOTS set, save the viewport scrolled to ``top`` as <name>.png."""
    folder = os.environ.get(SCREENSHOTS)
    if not folder:
        return
    await browser.evaluate(f"{top}.scrollIntoView({{block: 'start'}})")
    shot: dict[str, Any] = await browser.call("Page.captureScreenshot", format="png")
    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


async def test_a_person_watching_the_page_sees_the_breaker_compensations_and_a_parked_saga(
    fresh_database: str, rabbit_vhost: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    participants = FlakyParticipants()
    async with (
        overview_app(
            fresh_database,
            rabbit_vhost,
            etcd_url=etcd_server.url,
            port=free_port(),
            participants=participants,
        ) as app,
        serving_http(app.client) as base,
        Browser.launch(tmp_path) as browser,
    ):
        await app.place("alice")  # every participant called once: their breakers exist
        await log_in(browser, base)
        await browser.wait_for(f"{PAYMENT_BREAKER}?.innerText.includes('closed')")

        # Payment's only instance fails every request (seeded: the draws repeat run to run).
        participants.payment_faults.set(FaultSpec(error_rate=1.0, error_status=503, seed=16))
        placed = await app.client.post(
            "/orders",
            json={
                "customer_id": "bob",
                "items": [{"sku": "KB-101", "quantity": 1}],
                "destination": "DE",
            },
        )
        assert placed.status_code == 202, placed.text  # still charging when the POST answers
        caught = placed.json()["id"]
        await browser.wait_for(f"{PAYMENT_BREAKER}.innerText.includes('open')")
        assert await breaker_text(browser) == "payment payment-1 open"
        # The order caught in it is shown in flight (its charge retried until the breaker heals).
        await browser.wait_for(f"{card(caught, 'sagas-in-flight')} !== null")
        await screenshot(browser, "breaker-open", top="document.body")

        # Healed: the breaker lets one trial through after its reset time (5 s); it succeeds.
        participants.payment_faults.clear()
        await app.place("carol")
        await browser.wait_for(f"{PAYMENT_BREAKER}.innerText.includes('closed')", within=15)
        assert await breaker_text(browser) == "payment payment-1 closed"

        # Shipping refuses: the refund, then the release, listed after the forward steps.
        cancelled = await app.place(FAR_AWAY)
        undone = card(cancelled, "sagas-recent")
        await browser.wait_for(f"{undone}?.dataset.status === 'cancelled'")
        assert await step_lines(browser, undone) == [
            "\u2192 reserve_stock succeeded 1 attempt",
            "\u2192 charge_payment succeeded 1 attempt",
            "\u2192 create_shipment rejected 1 attempt"
            " destination_unreachable: no carrier goes there",
            "\u21a9 charge_payment succeeded 1 attempt",
            "\u21a9 reserve_stock succeeded 1 attempt",
        ]
        await screenshot(browser, "compensated", top=undone)

        # Inventory refuses the release: parked, standing out, with the retry link.
        parked = await app.place("stuck")
        stuck = card(parked, "sagas-parked")
        await browser.wait_for(f"{stuck}?.classList.contains('parked')")
        shown = " ".join((await browser.evaluate(f"{stuck}.innerText")).split())
        assert "compensation_failed" in shown
        assert "retry compensation" in shown
        assert (await step_lines(browser, stuck))[-1].startswith(
            "\u21a9 reserve_stock failed 1 attempt"
        )
        assert await browser.evaluate(f"getComputedStyle({stuck}).borderLeftColor") != (
            await browser.evaluate(f"getComputedStyle({undone}).borderLeftColor")
        )
        await screenshot(browser, "parked", top="document.body")
