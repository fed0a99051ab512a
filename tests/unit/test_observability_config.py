"""The observability profile's files, checked offline: Prometheus's configs pass ``promtool``,
the dashboard asks only for series the services export, Grafana's provisioning and the Jaeger
service are wired the way docker-compose.yml mounts and names them, and the local stack's
target list has the shape Prometheus's file discovery reads.

Debian's promtool (2.42) is built without Consul discovery, so the compose config is checked
with its ``consul_sd_configs`` swapped for a static target; the Consul part is checked here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from ordermesh_deploy.local import SERVICES
from ordermesh_deploy.prometheus_targets import TARGETS_FILE, target_groups, write_targets
from ordermesh_shared.messaging.consumer import ConsumerMetrics
from ordermesh_shared.messaging.monitor import QueueMonitor
from ordermesh_shared.metrics import Metrics
from ordermesh_shared.outbox.metrics import OutboxMetrics
from ordermesh_shared.resilience.client_metrics import ClientMetrics
from ordermesh_shared.saga.metrics import SagaMetrics

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
GRAFANA = OBSERVABILITY / "grafana"
DASHBOARD = GRAFANA / "ordermesh.json"
# Series Prometheus adds to every target itself.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_PROMQL_KEYWORDS |= {"and", "or", "unless", "bool", "offset"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool missing: Debian's prometheus package has it (make deps installs it)",
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")["services"]
    return services


def exported_series() -> set[str]:
    """Every series name the services' metric classes expose (counters as ``*_total``,
    histograms as ``*_bucket``/``_sum``/``_count``), read from the classes themselves."""
    metrics = Metrics(service="order")
    for family in (SagaMetrics, OutboxMetrics, ClientMetrics, ConsumerMetrics):
        family(metrics.registry)
    QueueMonitor(None, [], registry=metrics.registry)  # type: ignore[arg-type]  # gauges only
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        metric.name + suffix
        for metric in metrics.registry.collect()
        for suffix in suffixes[metric.type]
    }


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, labels, ranges left out)."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    names = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", expr)
    return set(names) - _PROMQL_KEYWORDS


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], t["expr"]) for panel in dashboard["panels"] for t in panel["targets"]]


# -- the dashboard ------------------------------------------------------------------------


def test_the_metric_name_reader_finds_series_and_skips_functions_and_labels() -> None:
    expr = 'histogram_quantile(0.9, sum by (le, step) (rate(a_bucket{x="y"}[1m]))) / b > 0'
    assert metric_names(expr) == {"a_bucket", "b"}


def test_every_dashboard_query_asks_for_series_the_services_export() -> None:
    known = exported_series() | SYNTHETIC
    unknown = {
        title: sorted(metric_names(expr) - known)
        for title, expr in dashboard_queries()
        if metric_names(expr) - known
    }
    assert unknown == {}
    assert all(metric_names(expr) for _title, expr in dashboard_queries())


def test_the_dashboard_has_the_panels_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(expr) for _title, expr in dashboard_queries()))
    assert {
        "sagas_finished_total",  # orders/s by outcome
        "http_request_duration_seconds_bucket",  # order latency percentiles
        "saga_step_duration_seconds_bucket",  # step latencies
        "client_breaker_state",  # breakers per instance
        "client_retry_budget_exhausted_total",  # retry budget
        "outbox_pending_events",  # outbox lag
        "outbox_relay_leader",  # relay leaders
        "messaging_queue_messages",  # consumer lag
        "messaging_dead_letter_messages",  # dead letters
    } <= used


def test_every_panel_uses_a_provisioned_datasource() -> None:
    provisioned = {
        source["uid"] for source in load_yaml(GRAFANA / "datasources.yml")["datasources"]
    }
    dashboard = json.loads(DASHBOARD.read_text())
    used = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    used |= {t["datasource"]["uid"] for panel in dashboard["panels"] for t in panel["targets"]}
    assert used <= provisioned
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


# -- Grafana and Jaeger as compose runs them ----------------------------------------------


def test_grafana_provisions_prometheus_and_jaeger_at_their_compose_names(
    compose: dict[str, Any],
) -> None:
    provisioning = load_yaml(GRAFANA / "datasources.yml")
    assert provisioning["apiVersion"] == 1
    sources = {source["type"]: source for source in provisioning["datasources"]}
    assert set(sources) == {"prometheus", "jaeger"}
    for kind, port in (("prometheus", 9090), ("jaeger", 16686)):
        url = urlsplit(sources[kind]["url"])
        assert (url.hostname, url.port) == (kind, port)
        assert kind in compose
    assert [s["name"] for s in provisioning["datasources"] if s.get("isDefault")] == ["Prometheus"]


def test_grafana_loads_the_dashboard_from_where_compose_mounts_it(
    compose: dict[str, Any],
) -> None:
    mounts = dict(str(v).split(":")[:2] for v in compose["grafana"]["volumes"] if v[0] == ".")
    assert mounts["./deploy/observability/grafana/datasources.yml"].startswith(
        "/etc/grafana/provisioning/datasources/"
    )
    assert mounts["./deploy/observability/grafana/dashboards.yml"].startswith(
        "/etc/grafana/provisioning/dashboards/"
    )
    [provider] = load_yaml(GRAFANA / "dashboards.yml")["providers"]
    assert provider["type"] == "file"
    dashboard_at = Path(mounts["./deploy/observability/grafana/ordermesh.json"])
    assert dashboard_at.parent == Path(provider["options"]["path"])
    environment = compose["grafana"]["environment"]
    assert environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == str(dashboard_at)
    # No default password: the admin's is the deployment's admin token.
    assert environment["GF_SECURITY_ADMIN_PASSWORD"].startswith("${ADMIN_TOKEN:?")


def test_jaeger_receives_otlp_over_http_where_the_docs_say(compose: dict[str, Any]) -> None:
    jaeger = compose["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "4318" in [str(port) for port in jaeger["expose"]]
    endpoint = "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318"
    assert endpoint in (ROOT / "docker-compose.yml").read_text()
    assert endpoint in (ROOT / "README.md").read_text()


# -- Prometheus ---------------------------------------------------------------------------


def promtool(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@needs_promtool
@pytest.mark.parametrize("name", ["prometheus-local.yml", "prometheus-offline.yml"])
def test_promtool_accepts_the_config(name: str) -> None:
    result = promtool(OBSERVABILITY / name)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # As recording rules, which promtool parses offline; Grafana fills in $__rate_interval.
    rules = [
        {"record": f"panel:{n}", "expr": expr.replace("$__rate_interval", "1m")}
        for n, (_title, expr) in enumerate(dashboard_queries())
    ]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "rules.yml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_compose_config_with_consul_stood_in_for(tmp_path: Path) -> None:
    config = load_yaml(OBSERVABILITY / "prometheus.yml")
    for job in config["scrape_configs"]:
        servers = [sd.pop("server") for sd in job.pop("consul_sd_configs")]
        job["static_configs"] = [{"targets": servers}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool(tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_watches_the_whole_consul_catalog(compose: dict[str, Any]) -> None:
    [job] = load_yaml(OBSERVABILITY / "prometheus.yml")["scrape_configs"]
    [consul] = job["consul_sd_configs"]
    assert consul == {"server": "consul:8500"}  # no service list: a new service is scraped too
    assert "consul" in compose
    relabel = {
        (tuple(r["source_labels"]), r.get("target_label", r.get("action")))
        for r in job["relabel_configs"]
    }
    assert (("__meta_consul_service",), "drop") in relabel
    assert (("__meta_consul_service",), "job") in relabel


def test_offline_prometheus_resolves_every_service_on_its_port(compose: dict[str, Any]) -> None:
    [job] = load_yaml(OBSERVABILITY / "prometheus-offline.yml")["scrape_configs"]
    [dns] = job["dns_sd_configs"]
    assert set(dns["names"]) == set(SERVICES)
    assert {str(compose[name]["environment"]["PORT"]) for name in SERVICES} == {str(dns["port"])}
    assert {r.get("target_label") for r in job["relabel_configs"]} == {"job"}


def test_local_prometheus_reads_the_file_the_local_stack_writes() -> None:
    config_file = OBSERVABILITY / "prometheus-local.yml"
    [job] = load_yaml(config_file)["scrape_configs"]
    [[path]] = [sd["files"] for sd in job["file_sd_configs"]]
    # Prometheus resolves the path from the config file's directory; `up` writes under .run/.
    assert (config_file.parent / path).resolve() == ROOT / ".run" / TARGETS_FILE


# -- the local stack's target list --------------------------------------------------------


def test_target_groups_list_every_instance_once_per_service() -> None:
    instances = {
        "order-1": "http://127.0.0.1:8000",
        "payment-2": "http://127.0.0.1:8012",
        "payment-1": "http://127.0.0.1:8002",
        "payment-10": "http://127.0.0.1:8092",
    }
    assert target_groups(instances) == [
        {"targets": ["127.0.0.1:8000"], "labels": {"service": "order"}},
        {
            "targets": ["127.0.0.1:8002", "127.0.0.1:8012", "127.0.0.1:8092"],
            "labels": {"service": "payment"},
        },
    ]


def test_write_targets_replaces_the_file_whole(tmp_path: Path) -> None:
    write_targets(
        tmp_path, {"order-1": "http://127.0.0.1:8000", "order-2": "http://127.0.0.1:8010"}
    )
    path = write_targets(tmp_path, {"order-1": "http://127.0.0.1:8000"})
    assert path == tmp_path / "prometheus" / "targets.json"
    assert json.loads(path.read_text()) == target_groups({"order-1": "http://127.0.0.1:8000"})
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]
