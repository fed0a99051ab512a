"""The overview page as a person sees it, in Debian's headless Chromium: the operator pastes
the admin token once, the page then shows the sagas with their timelines, the breakers and
the instances, and keeps up with what happens without being reloaded (a parked saga appears,
standing out, with a working retry link; an instance that stops answering turns unknown)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from ordermesh_shared.discovery import ServiceInstance

from tests.support.browser import MISSING, Browser, chromium_path
from tests.support.etcd import EtcdServer, free_port
from tests.support.overview import ADMIN_TOKEN, overview_app, serving_http

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(chromium_path() is None, reason=MISSING),
]


def saga_card(order_id: str, where: str) -> str:
    return f"document.querySelector('#{where} [data-saga-id=\"{order_id}\"]')"


async def test_the_page_shows_sagas_breakers_and_instances_and_follows_them_live(
    fresh_database: str, rabbit_vhost: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    async with (
        overview_app(
            fresh_database, rabbit_vhost, etcd_url=etcd_server.url, port=free_port()
        ) as app,
        serving_http(app.client) as base,
        Browser.launch(tmp_path) as browser,
    ):
        completed = await app.place("alice")
        await browser.open(f"{base}/ui")
        await browser.wait_for("!document.getElementById('login').hidden")

        # The operator pastes the token into the form, as a person would.
        await browser.evaluate(
            f"document.getElementById('token').value = {json.dumps(ADMIN_TOKEN)};"
            " document.getElementById('login').requestSubmit()"
        )
        card = saga_card(completed, "sagas-recent")
        await browser.wait_for(f"{card}?.dataset.status === 'completed'")
        steps = await browser.evaluate(
            f"[...{card}.querySelectorAll('.step')]"
            ".map(s => s.dataset.step + ' ' + s.dataset.status)"
        )
        assert steps == [
            "reserve_stock succeeded",
            "charge_payment succeeded",
            "create_shipment succeeded",
            "commit_stock succeeded",
        ]
        breaker = "document.querySelector('[data-breaker=\"payment/payment-1\"]')"
        assert await browser.evaluate(f"{breaker}.dataset.state") == "closed"
        leader = 'document.querySelector(\'[data-service="order"] [data-part="leader"]\')'
        await browser.wait_for(
            f"{leader}.textContent.includes({json.dumps(app.settings.instance_id)})"
        )
        # The token stays in this tab's sessionStorage, never in the address.
        assert ADMIN_TOKEN not in await browser.evaluate("location.href")
        assert await browser.evaluate("sessionStorage.length") == 1

        # From here on, nothing reloads the page: a marker on the window must survive.
        await browser.evaluate("window.sameDocument = true")
        parked = await app.place("stuck")
        card = saga_card(parked, "sagas-parked")
        await browser.wait_for(f"{card}?.classList.contains('parked')")
        last_step = await browser.evaluate(
            f"(s => [s.dataset.step, s.dataset.direction, s.dataset.status, s.textContent])"
            f"([...{card}.querySelectorAll('.step')].at(-1))"
        )
        assert last_step[:3] == ["reserve_stock", "compensate", "failed"]
        assert "release_refused" in last_step[3]
        retry = f"{card}.querySelector('a.retry')"
        assert await browser.evaluate(f"{retry}.getAttribute('href')") == f"/orders/{parked}/retry"
        # The link retries (a POST with the token); inventory still refuses, so it parks again.
        await browser.evaluate(f"{retry}.click()")
        release = f"POST /reservations/{parked}/release"
        async with asyncio.timeout(5):
            while app.participants.refused.count(release) < 2:
                await asyncio.sleep(0.05)

        await app.registry.register(
            ServiceInstance("shipping", "shipping-2", "127.0.0.1", free_port())
        )
        await browser.wait_for(
            "document.querySelector('[data-instance=\"shipping-2\"]')?.dataset.health === 'unknown'"
        )
        assert await browser.evaluate("window.sameDocument") is True
