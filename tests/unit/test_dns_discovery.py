"""REGISTRY=dns without a network: settings, the composition root's branch, query names."""

from __future__ import annotations

import dns.name
import pytest
from ordermesh_shared.bootstrap import make_registry
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.discovery.consul import ConsulRegistry
from ordermesh_shared.discovery.dns import DnsRegistry, split_server
from pydantic import ValidationError


def settings(**env: str) -> ServiceSettings:
    return ServiceSettings(**env)  # type: ignore[arg-type]


def test_registry_dns_registers_through_consul_unless_told_none() -> None:
    through_consul = make_registry(settings(registry="dns", dns_server="127.0.0.1:8600"))
    platform = make_registry(settings(registry="dns", dns_register="none"))

    assert isinstance(through_consul, DnsRegistry)
    assert isinstance(through_consul._registrar, ConsulRegistry)
    assert isinstance(platform, DnsRegistry)
    assert platform._registrar is None


@pytest.mark.parametrize("bad", ["consul:dns", "two words:53", "a:53:53"])
def test_a_malformed_dns_server_is_a_settings_error(bad: str) -> None:
    with pytest.raises(ValidationError, match="dns_server"):
        settings(dns_server=bad)


@pytest.mark.parametrize(
    ("server", "parsed"),
    [
        ("127.0.0.1:8600", ("127.0.0.1", 8600)),
        ("consul:8600", ("consul", 8600)),
        ("10.96.0.10", ("10.96.0.10", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
    ],
)
def test_dns_servers_are_host_and_port(server: str, parsed: tuple[str, int]) -> None:
    assert split_server(server) == parsed


def test_a_port_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="must look like"):
        DnsRegistry("127.0.0.1:70000")


def test_names_asked_for_consul_and_for_a_kubernetes_headless_service() -> None:
    consul = DnsRegistry("127.0.0.1:8600")
    kubernetes = DnsRegistry(domain="ordermesh.svc.cluster.local", port_name="http")

    assert consul._qname("payment") == dns.name.from_text("payment.service.consul.")
    assert kubernetes._qname("payment") == dns.name.from_text(
        "_http._tcp.payment.ordermesh.svc.cluster.local."
    )


def test_a_name_suffix_reaches_a_headless_service_named_apart_from_the_clusterip_one() -> None:
    registry = make_registry(
        settings(
            registry="dns",
            dns_register="none",
            dns_domain="ordermesh.svc.cluster.local",
            dns_port_name="http",
            dns_name_suffix="-peers",
        )
    )

    assert isinstance(registry, DnsRegistry)
    assert registry._qname("payment") == dns.name.from_text(
        "_http._tcp.payment-peers.ordermesh.svc.cluster.local."
    )


@pytest.mark.parametrize("bad", ["-peers.ordermesh", "_peers", "-Peers", "x" * 41])
def test_a_name_suffix_outside_one_dns_label_is_a_settings_error(bad: str) -> None:
    with pytest.raises(ValidationError, match="dns_name_suffix"):
        settings(dns_name_suffix=bad)
