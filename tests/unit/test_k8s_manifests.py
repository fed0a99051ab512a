"""The Kubernetes manifests: valid for 1.30, hardened, and pointed at what the code serves.

Three kinds of check, all offline (no cluster was run for these manifests):
- every resource validates against the bundled 1.30 schemas (kubernetes-validate, strict);
- a static security check, plain assertions over the parsed YAML (``pod_problems``);
- drift checks against the code: probe paths are the apps' health routes, probe ports the
  ports the settings listen on, the image user the Dockerfile's, the readiness path the
  compose healthcheck's.
The local overlay is rendered with ``kubectl kustomize`` where a kubectl is on PATH.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from inventory.app import InventorySettings
from inventory.app import create_app as inventory_app
from order.app import OrderSettings
from order.app import create_app as order_app
from ordermesh_shared.bootstrap import make_registry
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.discovery.dns import DnsRegistry
from payment.app import PaymentSettings
from payment.app import create_app as payment_app
from shipping.app import ShippingSettings
from shipping.app import create_app as shipping_app

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
LOCAL = K8S / "overlays" / "local"
DNS_OVERLAY = K8S / "overlays" / "dns"
KUBERNETES_VERSION = "1.30.0"
Doc = dict[str, Any]

SERVICES: dict[str, tuple[type[ServiceSettings], Any]] = {
    "order": (OrderSettings, order_app),
    "inventory": (InventorySettings, inventory_app),
    "payment": (PaymentSettings, payment_app),
    "shipping": (ShippingSettings, shipping_app),
}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD")
# Only for building settings in the test: the manifests take the real one from a Secret.
DUMMY_SECRET = "k8s-manifest-test-" + "x" * 32


# --- reading the kustomizations and their files ---------------------------------------------


def load_all(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(folder: Path) -> Doc:
    docs = load_all(folder / "kustomization.yaml")
    assert len(docs) == 1, f"{folder}: one kustomization document"
    return docs[0]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def listed_resources(folder: Path) -> list[Path]:
    return [(folder / entry).resolve() for entry in kustomization(folder).get("resources", [])]


def listed_patches(folder: Path) -> list[Path]:
    patches = kustomization(folder).get("patches", [])
    return [(folder / p["path"]).resolve() for p in patches if "path" in p]


def resource_files() -> list[Path]:
    """Every manifest file a kustomization lists as a resource (folders are kustomizations)."""
    return [p for d in kustomization_dirs() for p in listed_resources(d) if p.is_file()]


@cache
def base_docs() -> tuple[Doc, ...]:
    return tuple(doc for path in listed_resources(BASE) for doc in load_all(path))


def named(docs: tuple[Doc, ...] | list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    template = workload["spec"].get("jobTemplate", {}).get("spec", workload["spec"])
    spec: Doc = template["template"]["spec"]
    return spec


def containers(spec: Doc) -> Iterator[Doc]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


# --- the static security check ---------------------------------------------------------------


def pod_problems(workload: Doc) -> list[str]:
    """What breaks the hardening rules in one workload; empty when it is fine."""
    spec = pod_spec(workload)
    where = f"{workload['kind']}/{workload['metadata']['name']}"
    problems = [f"{where}: {p}" for p in _pod_level_problems(spec)]
    for container in containers(spec):
        found = _container_problems(container, spec.get("securityContext", {}))
        problems += [f"{where}/{container['name']}: {p}" for p in found]
    return problems


def _pod_level_problems(spec: Doc) -> list[str]:
    problems = [f"{flag} is on" for flag in ("hostNetwork", "hostPID", "hostIPC") if spec.get(flag)]
    problems += [f"hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("mounts a service account token it never uses")
    return problems


def _container_problems(container: Doc, pod_context: Doc) -> list[str]:
    context = container.get("securityContext", {})

    def setting(key: str) -> Any:
        # Pod-level values are defaults the container's own override.
        return context.get(key, pod_context.get(key))

    problems = []
    if setting("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if context.get("privileged"):
        problems.append("privileged")
    if context.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities do not drop ALL")
    if context.get("capabilities", {}).get("add"):
        problems.append("capabilities added")
    if (setting("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile is not RuntimeDefault")
    return problems + _image_problems(container["image"]) + _runtime_problems(container)


def _image_problems(image: str) -> list[str]:
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if "@sha256:" in image:
        return []
    if not tag:
        return [f"image {image} has no tag (means latest)"]
    return [f"image {image} uses latest"] if tag == "latest" else []


def _runtime_problems(container: Doc) -> list[str]:
    resources = container.get("resources", {})
    problems = [
        f"no {kind}.{what}"
        for kind in ("requests", "limits")
        for what in ("cpu", "memory")
        if what not in resources.get(kind, {})
    ]
    return problems + [f"no {probe}" for probe in PROBES if probe not in container]


def workloads(docs: tuple[Doc, ...] | list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOADS]


# --- the kustomizations -----------------------------------------------------------------------


def test_kustomizations_list_existing_files() -> None:
    for folder in kustomization_dirs():
        for path in listed_resources(folder) + listed_patches(folder):
            is_base = path.is_dir() and (path / "kustomization.yaml").is_file()
            assert path.is_file() or is_base, f"{folder}: lists {path}, which is missing"


def test_every_manifest_file_is_used() -> None:
    listed = {p for d in kustomization_dirs() for p in listed_resources(d) + listed_patches(d)}
    for path in K8S.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, f"{path} is in no kustomization"


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_the_schemas(path: Path) -> None:
    for doc in load_all(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_no_secret_values_are_committed() -> None:
    assert not [d for d in base_docs() if d["kind"] == "Secret"]
    for workload in workloads(base_docs()):
        for container in containers(pod_spec(workload)):
            for var in container.get("env", []):
                secret_like = any(word in var["name"] for word in SECRET_WORDS)
                if secret_like:
                    assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]
                # A URL with credentials takes them from variables, never literally.
                password = urlsplit(var.get("value", "")).password
                assert password is None or re.fullmatch(r"\$\(\w+\)", password), var["name"]


# --- security ---------------------------------------------------------------------------------


def test_every_workload_is_hardened() -> None:
    assert len(workloads(base_docs())) == 5
    for workload in workloads(base_docs()):
        assert pod_problems(workload) == []


def test_the_security_check_finds_what_it_looks_for() -> None:
    broken = copy.deepcopy(named(base_docs(), "Deployment", "payment"))
    spec = pod_spec(broken)
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    container = spec["containers"][0]
    container["image"] = "ordermesh/payment:latest"
    container["securityContext"].update(privileged=True, readOnlyRootFilesystem=False)
    del container["livenessProbe"], container["resources"]["limits"]
    found = "\n".join(pod_problems(broken))
    for problem in ("hostPath", "latest", "privileged", "readOnlyRoot", "livenessProbe", "limits"):
        assert problem in found


def test_every_workload_has_a_disruption_budget() -> None:
    budgets = [d for d in base_docs() if d["kind"] == "PodDisruptionBudget"]
    for workload in workloads(base_docs()):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if _selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, workload["metadata"]["name"]


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


# --- the services, against their code ---------------------------------------------------------


def service_container(service: str) -> Doc:
    deployment = named(base_docs(), "Deployment", service)
    return next(c for c in pod_spec(deployment)["containers"] if c["name"] == service)


def settings_from(
    container: Doc, settings_cls: type[ServiceSettings], *, overlay: Doc | None = None
) -> ServiceSettings:
    """The settings the service would read from this container's literal env and ConfigMap
    (the base's, with an overlay's ConfigMap patch ``overlay`` over it)."""
    config = named(base_docs(), "ConfigMap", "ordermesh-config")["data"]
    config = {**config, **(overlay or {})}
    literal = {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}
    env = {**config, **literal}
    fields = {k.lower(): v for k, v in env.items() if k.lower() in settings_cls.model_fields}
    fields = {k: v for k, v in fields.items() if "$(" not in v}
    # The pod's IP comes from the downward API; any address stands for it here.
    given = {"service_token_secret": DUMMY_SECRET, "advertise_host": "10.0.0.1", **fields}
    return settings_cls(**given)


def health_paths(app_factory: Any, settings: ServiceSettings) -> dict[str, str]:
    """The app's health routes by handler name (``live``, ``ready``) from its OpenAPI document."""
    paths = app_factory(settings).openapi()["paths"]
    by_handler = {}
    for path, item in paths.items():
        operation = item.get("get", {})
        if "health" in operation.get("tags", []):
            by_handler[operation["operationId"].split("_", 1)[0]] = path
    return by_handler


def probe_port(container: Doc, probe: Doc) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


def compose_readiness_path() -> str:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = " ".join(compose["x-service"]["healthcheck"]["test"])
    match = re.search(r"http://[^/]+(/[\w/]+)", command)
    assert match, command
    return match.group(1)


@pytest.mark.parametrize("service", SERVICES)
def test_probes_point_at_the_health_routes_the_app_serves(service: str) -> None:
    settings_cls, app_factory = SERVICES[service]
    container = service_container(service)
    paths = health_paths(app_factory, settings_from(container, settings_cls))
    assert container["startupProbe"]["httpGet"]["path"] == paths["live"]
    # Liveness must not follow dependencies: a database outage would restart every pod.
    assert container["livenessProbe"]["httpGet"]["path"] == paths["live"]
    assert container["readinessProbe"]["httpGet"]["path"] == paths["ready"]
    assert paths["ready"] == compose_readiness_path()


@pytest.mark.parametrize("service", SERVICES)
def test_probes_and_service_reach_the_port_the_settings_listen_on(service: str) -> None:
    settings_cls, _ = SERVICES[service]
    container = service_container(service)
    settings = settings_from(container, settings_cls)
    # The kubelet probes the pod's IP, and peers call it there: loopback would fail both.
    assert settings.host == "0.0.0.0"
    for probe in PROBES:
        assert probe_port(container, container[probe]) == settings.port, probe
    target = named(base_docs(), "Service", service)["spec"]["ports"][0]["targetPort"]
    assert probe_port(container, {"httpGet": {"port": target}}) == settings.port


@pytest.mark.parametrize("service", SERVICES)
def test_service_pods_run_as_the_image_user_with_a_writable_tmp(service: str) -> None:
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "deploy/Dockerfile").read_text(), re.M)
    assert user
    deployment = named(base_docs(), "Deployment", service)
    context = pod_spec(deployment)["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(user[1]), int(user[2]))
    container = service_container(service)
    assert container["image"].startswith(f"ordermesh/{service}:")
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0


def test_required_settings_come_from_the_manifest() -> None:
    for service, (settings_cls, _) in SERVICES.items():
        container = service_container(service)
        names = {v["name"] for v in container["env"]}
        required = {n.upper() for n, f in settings_cls.model_fields.items() if f.is_required()}
        assert required <= names, service
        assert {"DATABASE_URL", "RABBITMQ_URL", "ADVERTISE_HOST", "INSTANCE_ID"} <= names


def test_order_runs_several_replicas() -> None:
    assert named(base_docs(), "Deployment", "order")["spec"]["replicas"] >= 2


def test_etcd_keeps_its_data_on_persistent_volumes() -> None:
    etcd = named(base_docs(), "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3
    claims = {c["metadata"]["name"] for c in etcd["spec"]["volumeClaimTemplates"]}
    container = pod_spec(etcd)["containers"][0]
    data_dir = next(a.split("=", 1)[1] for a in container["command"] if a.startswith("--data-dir"))
    mounts = [m for m in container["volumeMounts"] if data_dir.startswith(m["mountPath"] + "/")]
    assert [m["name"] for m in mounts] == ["data"], f"{data_dir} is not on the data volume"
    assert "data" in claims


# --- DNS discovery: headless Services and the dns overlay -----------------------------------


def peers_service(service: str) -> Doc:
    return named(base_docs(), "Service", f"{service}-peers")


@pytest.mark.parametrize("service", SERVICES)
def test_a_headless_service_selects_the_same_pods_as_the_clusterip_one(service: str) -> None:
    headless, clusterip = peers_service(service)["spec"], named(base_docs(), "Service", service)
    assert headless["clusterIP"] == "None"
    assert "clusterIP" not in clusterip["spec"]
    # A pod is answered only while ready, as an instance is registered only while ready.
    assert headless["publishNotReadyAddresses"] is False
    assert headless["selector"] == clusterip["spec"]["selector"]
    pods = named(base_docs(), "Deployment", service)["spec"]["template"]["metadata"]["labels"]
    assert _selects({"matchLabels": headless["selector"]}, pods)
    [port] = headless["ports"]
    assert port == clusterip["spec"]["ports"][0]
    assert port["name"] == "http"


def dns_overlay_config() -> dict[str, str]:
    [patch] = listed_patches(DNS_OVERLAY)
    doc = named(load_all(patch), "ConfigMap", "ordermesh-config")
    data: dict[str, str] = doc["data"]
    return data


@pytest.mark.parametrize("service", SERVICES)
def test_the_dns_overlay_asks_for_the_headless_services(service: str) -> None:
    settings_cls, _ = SERVICES[service]
    overlay = dns_overlay_config()
    settings = settings_from(service_container(service), settings_cls, overlay=overlay)
    registry = make_registry(settings)
    assert isinstance(registry, DnsRegistry)
    assert registry._registrar is None  # the platform registers: ready pods are answered
    namespace = kustomization(LOCAL)["namespace"]
    assert listed_resources(DNS_OVERLAY) == [LOCAL.resolve()]
    port = peers_service(service)["spec"]["ports"][0]["name"]
    name = f"_{port}._tcp.{service}-peers.{namespace}.svc.cluster.local."
    assert registry._qname(service).to_text() == name
    assert settings.etcd_url  # still there: locks, fencing tokens and elections need etcd


# --- the rendered overlay ---------------------------------------------------------------------


def render(overlay: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH to render the overlay; its files are checked one by one")
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered_local() -> list[Doc]:
    return render(LOCAL)


def test_rendered_overlay_validates_and_stays_hardened(rendered_local: list[Doc]) -> None:
    for doc in rendered_local:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {d["metadata"].get("namespace", "ordermesh") for d in rendered_local} == {"ordermesh"}
    for workload in workloads(rendered_local):
        assert pod_problems(workload) == []
    assert named(rendered_local, "Deployment", "order")["spec"]["replicas"] >= 2


def test_rendered_dns_overlay_switches_only_the_registry() -> None:
    rendered, local = render(DNS_OVERLAY), render(LOCAL)
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    config = named(rendered, "ConfigMap", "ordermesh-config")["data"]
    before = named(local, "ConfigMap", "ordermesh-config")["data"]
    assert config == {**before, **dns_overlay_config()}
    assert [d for d in rendered if d["kind"] != "ConfigMap"] == [
        d for d in local if d["kind"] != "ConfigMap"
    ]
    peers = [d for d in rendered if d["metadata"]["name"].endswith("-peers")]
    assert {d["metadata"].get("namespace") for d in peers} == {kustomization(LOCAL)["namespace"]}
    assert len(peers) == len(SERVICES)
