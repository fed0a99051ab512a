"""Placing an order through a stack's public API and waiting for its saga to end (blocking)."""

from __future__ import annotations

import time
from typing import Any

import httpx


def place(
    url: str, body: dict[str, Any], *, within: float = 60, pause: float = 0.5
) -> dict[str, Any]:
    """POST ``body`` to ``url``/orders, then poll while it is pending (at most ``within`` s)."""
    response = httpx.post(f"{url}/orders", json=body, timeout=30)
    assert response.status_code in (201, 202), response.text
    order: dict[str, Any] = response.json()
    deadline = time.monotonic() + within
    while order["status"] == "pending" and time.monotonic() < deadline:
        time.sleep(pause)
        order = httpx.get(f"{url}/orders/{order['id']}", timeout=10).json()
    return order
