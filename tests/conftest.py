"""Test-wide fixtures live in tests/support/*, loaded here as plugins so each kind stays apart."""

import importlib.util
import secrets

import pytest

pytest_plugins = [
    name
    for name in (
        # Order matters: a plugin imported by another must be registered first.
        "tests.support.postgres",
        "tests.support.etcd",
        "tests.support.rabbitmq",
        "tests.support.consul_fixture",
        "tests.support.stack",
    )
    if importlib.util.find_spec(name) is not None
]


@pytest.fixture(autouse=True)
def service_token_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """A SERVICE_TOKEN_SECRET of this test's own: every service Settings() a test builds
    reads it (there is no default), so the apps of one test trust each other's tokens."""
    secret = secrets.token_urlsafe(32)
    monkeypatch.setenv("SERVICE_TOKEN_SECRET", secret)
    return secret
