"""Which DSNs skip TLS: only this machine's, and only when nobody chose an sslmode."""

import pytest
from ordermesh_shared.database import loopback_ssl


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p@127.0.0.1:5432/orders",
        "postgresql://u@localhost/orders",
        "postgresql://u@[::1]:5432/orders",
        "postgresql:///orders?host=/var/run/postgresql",
        "postgresql:///orders",
    ],
)
def test_a_dsn_on_this_machine_goes_without_tls(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.delenv("PGHOST", raising=False)
    assert loopback_ssl(dsn) is False


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u@postgres:5432/orders",
        "postgresql://u@10.0.0.7/orders",
        "postgresql://u@127.0.0.1/orders?sslmode=require",
        "postgresql://u@127.0.0.1,db2/orders",
    ],
)
def test_a_remote_or_chosen_mode_keeps_asyncpgs_default(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.delenv("PGHOST", raising=False)
    assert loopback_ssl(dsn) is None


def test_pgsslmode_is_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLMODE", "require")
    assert loopback_ssl("postgresql://u@127.0.0.1/orders") is None


def test_a_dsn_without_a_host_is_judged_by_pghost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.setenv("PGHOST", "db.example.org")
    assert loopback_ssl("postgresql:///orders") is None
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    assert loopback_ssl("postgresql:///orders") is False
