"""The compose stack's configuration, checked without a Docker engine.

These read docker-compose.yml and the files it mounts, and assert what someone running
`docker compose up` would trip over: a service that never turns healthy, a dependency
started too early, a replica that cannot be scaled, a database or login that does not exist.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from ordermesh_deploy import compose as stack

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
OFFLINE_FILE = ROOT / stack.OFFLINE_FILE
INIT_SCRIPT = ROOT / "deploy" / "postgres" / "init.sh"
RABBITMQ_DIR = ROOT / "deploy" / "rabbitmq"
# What `make up` would write into .env: a value per secret, made up here.
SECRETS = {name: f"secret-{name.lower()}" for name in stack.SECRET_NAMES}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")

APP_SERVICES = ("order", "inventory", "payment", "shipping")
SCALABLE_SERVICES = ("inventory", "payment", "shipping")
INFRA_SERVICES = ("consul", "etcd", "postgres", "rabbitmq")
OBSERVABILITY_SERVICES = ("prometheus", "jaeger", "grafana")  # profile `observability`

Service = dict[str, Any]


def interpolate(text: str, env: dict[str, str]) -> str:
    """${VAR}, ${VAR:-default} and ${VAR:?error} as compose reads them (unset -> default)."""
    return _VARIABLE.sub(lambda m: env.get(m[1], m[2] if "-" in m[0] else ""), text)


@pytest.fixture(scope="module")
def services() -> dict[str, Service]:
    # safe_load resolves the `<<` merge keys, giving each service as compose sees it.
    compose = yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), SECRETS))
    result: dict[str, Service] = compose["services"]
    return result


@pytest.fixture(scope="module")
def raw_services() -> dict[str, Service]:
    """The services before interpolation: what the file itself says."""
    result: dict[str, Service] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return result


@pytest.fixture(scope="module")
def offline_services() -> dict[str, Service]:
    result: dict[str, Service] = yaml.safe_load(OFFLINE_FILE.read_text())["services"]
    return result


def _environment(service: Service) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _port_specs(service: Service) -> list[tuple[str | None, str]]:
    """Each published port as (host port or None when ephemeral, container port)."""
    specs: list[tuple[str | None, str]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published = port.get("published")
            specs.append((str(published) if published else None, str(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host = parts[-2] if len(parts) >= 2 else None
        specs.append((host or None, parts[-1]))
    return specs


def _bind_mounts(service: Service) -> dict[str, str]:
    """Host path -> container path, for the short-syntax bind mounts of a service."""
    mounts = (str(volume).split(":") for volume in service.get("volumes", []))
    return {source: target for source, target, *_ in mounts if source.startswith(".")}


def test_the_stack_has_the_infrastructure_and_the_four_services(
    services: dict[str, Service],
) -> None:
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == set(INFRA_SERVICES) | set(APP_SERVICES)
    profiled = {
        name: service["profiles"] for name, service in services.items() if name not in default
    }
    assert profiled == {name: ["observability"] for name in OBSERVABILITY_SERVICES}


def test_every_service_has_a_healthcheck(services: dict[str, Service]) -> None:
    missing = [
        name
        for name, service in services.items()
        if not service.get("healthcheck", {}).get("test") or service["healthcheck"].get("disable")
    ]
    assert missing == []


def test_app_healthchecks_probe_readiness_on_the_port_the_service_listens_on(
    services: dict[str, Service],
) -> None:
    for name in APP_SERVICES:
        probe = " ".join(services[name]["healthcheck"]["test"])
        port = _environment(services[name])["PORT"]
        assert f"127.0.0.1:{port}/health/ready" in probe, name


def test_every_dependency_waits_for_health(services: dict[str, Service]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        # The short list form only waits for the container to start.
        assert isinstance(depends_on, dict), f"{name}: depends_on must use the long form"
        for dependency, options in depends_on.items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert options.get("condition") == "service_healthy", f"{name} -> {dependency}"


def test_app_services_wait_for_all_infrastructure(services: dict[str, Service]) -> None:
    for name in APP_SERVICES:
        assert set(INFRA_SERVICES) <= set(services[name]["depends_on"]), name


@pytest.mark.parametrize("name", SCALABLE_SERVICES)
def test_scalable_services_can_run_several_replicas(
    services: dict[str, Service], name: str
) -> None:
    service = services[name]
    assert "container_name" not in service
    fixed = [host for host, _ in _port_specs(service) if host is not None]
    assert fixed == [], f"{name} pins host port(s) {fixed}; --scale would collide"


def test_scalable_services_are_reachable_from_the_host_through_an_ephemeral_port(
    services: dict[str, Service],
) -> None:
    for name in SCALABLE_SERVICES:
        port = _environment(services[name])["PORT"]
        assert (None, port) in _port_specs(services[name]), name


def test_order_api_is_published_on_host_port_8000(services: dict[str, Service]) -> None:
    order = services["order"]
    assert ("8000", _environment(order)["PORT"]) in _port_specs(order)


def test_only_the_order_api_the_uis_and_consul_dns_have_fixed_host_ports(
    services: dict[str, Service],
) -> None:
    fixed = {host for service in services.values() for host, _ in _port_specs(service) if host}
    # Prometheus, Jaeger and Grafana are the observability profile's UIs; 8600 is Consul's
    # DNS interface (dig, and demo-cap's DNS phase), UDP and TCP.
    assert fixed == {"8000", "8500", "8600", "15672", "9090", "16686", "3000"}


def test_each_service_logs_in_with_the_role_and_password_init_sh_creates(
    services: dict[str, Service], raw_services: dict[str, Service]
) -> None:
    # init.sh makes ordermesh_<service> (role and database) with the password in a variable.
    created = dict(
        re.findall(
            r'^create_service_database (\w+) "\$\{(\w+):\?\}"', INIT_SCRIPT.read_text(), re.M
        )
    )
    postgres_env = _environment(raw_services["postgres"])
    for name in APP_SERVICES:
        url = urlsplit(_environment(services[name])["DATABASE_URL"])
        assert url.hostname == "postgres", name
        assert url.username == f"ordermesh_{name}" == url.path.lstrip("/"), name
        variable = created[name]
        # The service and the init script read the same secret.
        assert url.password == SECRETS[variable], name
        assert postgres_env[variable].startswith(f"${{{variable}:?"), name


def test_services_build_from_the_shared_dockerfile_for_an_existing_service(
    services: dict[str, Service],
) -> None:
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        service_dir = ROOT / "services" / build["args"]["SERVICE"]
        assert (service_dir / "pyproject.toml").is_file(), name
        assert build["args"]["SERVICE"] == name


def test_services_find_the_infrastructure_by_compose_service_name(
    services: dict[str, Service],
) -> None:
    for name in APP_SERVICES:
        env = _environment(services[name])
        assert env["REGISTRY"] == "consul", name
        for variable in ("CONSUL_URL", "ETCD_URL", "RABBITMQ_URL", "DATABASE_URL"):
            assert urlsplit(env[variable]).hostname in services, f"{name}: {variable}"


def test_no_service_advertises_a_fixed_address(services: dict[str, Service]) -> None:
    # A fixed address would make every replica register the same endpoint.
    for name in APP_SERVICES:
        assert "ADVERTISE_HOST" not in _environment(services[name]), name


def test_app_services_restart_unless_stopped(services: dict[str, Service]) -> None:
    for name in APP_SERVICES:
        assert services[name].get("restart") == "unless-stopped", name


def test_files_mounted_into_containers_exist(services: dict[str, Service]) -> None:
    # A missing bind-mount source becomes an empty directory, not an error.
    generated = "./" + str(stack.DEFINITIONS_FILE.relative_to(ROOT))
    for name, service in services.items():
        for source in _bind_mounts(service):
            # The definitions file is written by `make up` (ordermesh-compose) before compose.
            assert (ROOT / source).is_file() or source == generated, f"{name}: {source}"


def test_postgres_runs_init_sh_on_first_start(services: dict[str, Service]) -> None:
    mounts = _bind_mounts(services["postgres"])
    assert mounts["./deploy/postgres/init.sh"].startswith("/docker-entrypoint-initdb.d/")


def test_rabbitmq_loads_the_definitions_file_compose_mounts(
    services: dict[str, Service],
) -> None:
    conf = (RABBITMQ_DIR / "rabbitmq.conf").read_text()
    lines = (line.split("=", 1) for line in conf.splitlines() if "=" in line)
    settings = {key.strip(): value.strip() for key, value in lines if not key.startswith("#")}
    mounts = _bind_mounts(services["rabbitmq"])
    generated = "./" + str(stack.DEFINITIONS_FILE.relative_to(ROOT))
    assert settings["definitions.local.path"] == mounts[generated]
    assert mounts["./deploy/rabbitmq/rabbitmq.conf"].startswith("/etc/rabbitmq/")
    # guest stays limited to loopback (there is no guest user at all in the definitions).
    assert "loopback_users" not in settings


def test_rabbitmq_definitions_declare_the_event_and_dead_letter_exchanges() -> None:
    definitions = json.loads((RABBITMQ_DIR / "definitions.json").read_text())
    exchanges = {exchange["name"]: exchange for exchange in definitions["exchanges"]}
    assert exchanges["ordermesh.events"]["type"] == "topic"
    assert exchanges["ordermesh.events"]["durable"] is True
    assert exchanges["ordermesh.dlx"]["durable"] is True
    # Dead letters routed to an exchange with no queue bound would be dropped.
    assert any(
        binding["source"] == "ordermesh.dlx" and binding["destination_type"] == "queue"
        for binding in definitions["bindings"]
    )


def test_each_service_logs_in_to_rabbitmq_as_its_own_user(services: dict[str, Service]) -> None:
    definitions: Any = stack.rabbitmq_definitions(SECRETS)
    users = {user["name"]: user for user in definitions["users"]}
    assert "guest" not in users
    for name in APP_SERVICES:
        url = urlsplit(_environment(services[name])["RABBITMQ_URL"])
        vhost = url.path[1:] or "/"
        assert url.username == name
        user = users[name]
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        salted = base64.b64decode(user["password_hash"])
        salt, digest = salted[:4], salted[4:]
        assert hashlib.sha256(salt + (url.password or "").encode()).digest() == digest, name
        assert {"name": vhost} in [{"name": v["name"]} for v in definitions["vhosts"]]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_a_service_may_use_its_own_queues_and_the_shared_exchanges_only(name: str) -> None:
    definitions: Any = stack.rabbitmq_definitions(SECRETS)
    [grant] = [p for p in definitions["permissions"] if p["user"] == name]
    own = (f"{name}.timeline", "ordermesh.events", "ordermesh.dlx", "ordermesh.dead-letters")
    others = [f"{other}.timeline" for other in APP_SERVICES if other != name]
    for kind in ("configure", "write", "read"):
        assert all(re.fullmatch(grant[kind], resource) for resource in own), kind
        assert not any(re.fullmatch(grant[kind], resource) for resource in others), kind


def test_no_secret_has_a_default_in_the_compose_file() -> None:
    text = COMPOSE_FILE.read_text()
    # The broker admin's password reaches RabbitMQ only through the generated definitions.
    for name in set(stack.SECRET_NAMES) - {"RABBITMQ_ADMIN_PASSWORD"}:
        uses = re.findall(rf"\$\{{{name}(:?[-?])?", text)
        assert uses, f"{name} is never used"
        # ${NAME:?...}: compose refuses to start without it; never ${NAME:-default} or bare.
        assert set(uses) == {":?"}, name
    assert "guest" not in text


def test_published_ports_are_on_loopback_except_the_order_api(
    raw_services: dict[str, Service],
) -> None:
    for name, service in raw_services.items():
        for port in service.get("ports", []):
            if name == "order":
                continue
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


@pytest.mark.parametrize("name", INFRA_SERVICES + APP_SERVICES + OBSERVABILITY_SERVICES)
def test_every_container_runs_with_least_privilege(services: dict[str, Service], name: str) -> None:
    service = services[name]
    assert service.get("read_only") is True
    assert service.get("cap_drop") == ["ALL"]
    assert "no-new-privileges:true" in service.get("security_opt", [])
    assert service.get("mem_limit")


def test_images_are_pinned_to_the_version_lines_the_offline_stack_runs(
    services: dict[str, Service], offline_services: dict[str, Service]
) -> None:
    # The offline images are Debian's builds of PostgreSQL 15, RabbitMQ 3.10 and etcd 3.4:
    # a user's stack must run the same lines, so what CI tests is what users get.
    for name in ("postgres", "rabbitmq", "etcd", "prometheus"):
        line = offline_services[name]["image"].rsplit(":", 1)[1]
        tag = services[name]["image"].rsplit(":", 1)[1].lstrip("v")
        assert tag == line or tag.startswith((f"{line}.", f"{line}-")), f"{name}: {tag}"
    for name, service in services.items():
        assert ":" in service["image"], name
        assert not service["image"].endswith(":latest"), name


def test_compose_file_matches_the_compose_specification() -> None:
    uv = shutil.which("uv")
    assert uv is not None, "uv is needed to run check-jsonschema"
    result = subprocess.run(
        [
            uv,
            "run",
            "--no-sync",
            "check-jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
