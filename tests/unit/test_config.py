"""Settings: defaults that work locally, and one clear line for a bad variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from inventory.app import InventorySettings
from order.app import OrderSettings


def test_defaults_point_at_the_local_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "DATABASE_URL", "INSTANCE_ID", "HOST", "ADVERTISE_HOST"):
        monkeypatch.delenv(name, raising=False)
    settings = OrderSettings()
    assert settings.port == 8000
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/ordermesh_order"
    assert settings.instance_id == "order-127.0.0.1-8000"
    assert InventorySettings().port == 8001


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9100")
    monkeypatch.setenv("REGISTRY", "consul")
    settings = InventorySettings()
    assert (settings.port, settings.registry) == (9100, "consul")
    assert settings.instance_id == "inventory-127.0.0.1-9100"


@pytest.mark.parametrize(
    ("name", "value"),
    [("PORT", "eighty"), ("REGISTRY", "zookeeper"), ("REGISTRY_TTL", "-1")],
)
def test_bad_setting_exits_with_one_line_naming_it(name: str, value: str) -> None:
    env = {**os.environ, name: value}
    result = subprocess.run(
        [sys.executable, "-m", "inventory"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ordermesh-inventory: invalid settings:")
    assert f"{name}={value!r}" in lines[0]


@pytest.mark.parametrize("value", [None, "too-short"])
def test_a_missing_or_short_service_token_secret_stops_the_service_without_showing_it(
    value: str | None,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SERVICE_TOKEN_SECRET"}
    if value is not None:
        env["SERVICE_TOKEN_SECRET"] = value
    result = subprocess.run(
        [sys.executable, "-m", "payment"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ordermesh-payment: invalid settings: SERVICE_TOKEN_SECRET")
    assert "too-short" not in lines[0]


def test_no_admin_token_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    assert OrderSettings().admin_token is None
