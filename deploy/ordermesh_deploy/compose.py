"""The compose stack: secrets, images, start-up and a wait for health, on either Compose tool.

``ordermesh-compose up`` (``make up``) writes the stack's secrets into a git-ignored ``.env``
when they are absent, decides whether a container registry can be reached, builds every image
from Debian's packages when it cannot (``deploy/images/build.sh``, adding
``deploy/compose/offline.yml``), starts the stack and waits until every container is healthy,
showing progress. ``down`` stops it, ``reset`` wipes its data (the demo data is seeded again on
the next start), ``status`` lists the containers, ``logs`` follows their logs.

The same functions tell the other tools (chaos, audit, load, events) how to run compose
commands: ``compose_command()`` picks ``docker compose`` (v2) or ``docker-compose`` (v1),
and every command runs in the repository root, so Compose reads ``.env`` (project name,
files, secrets) exactly as a person typing ``docker compose ...`` there would.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = ROOT / ".env"
DEFINITIONS_TEMPLATE = ROOT / "deploy" / "rabbitmq" / "definitions.json"
DEFINITIONS_FILE = ROOT / ".run" / "compose" / "rabbitmq-definitions.json"
OFFLINE_FILE = "deploy/compose/offline.yml"
BUILD_SCRIPT = ROOT / "deploy" / "images" / "build.sh"
PROJECT = "ordermesh"
SERVICES = ("order", "inventory", "payment", "shipping")
# Any answer (401 included) means the engine could pull; no answer in time means offline.
REGISTRY_PROBE = "https://registry-1.docker.io/v2/"

SECRET_NAMES = (
    "ADMIN_TOKEN",
    "SERVICE_TOKEN_SECRET",
    "POSTGRES_PASSWORD",
    "AUDIT_DB_PASSWORD",
    "RABBITMQ_ADMIN_PASSWORD",
    *(f"{service.upper()}_DB_PASSWORD" for service in SERVICES),
    *(f"{service.upper()}_AMQP_PASSWORD" for service in SERVICES),
)


def read_env(path: Path = ENV_FILE) -> dict[str, str]:
    """The KEY=value pairs of a dotenv file (comments and blank lines skipped)."""
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.startswith("#")}


def ensure_env(*, offline: bool | None) -> dict[str, str]:
    """Write ``.env`` with every missing secret generated; existing values are kept.

    ``offline`` chooses the compose files (None: keep the recorded choice, else offline).
    """
    env = read_env()
    if offline is None:
        offline = OFFLINE_FILE in env.get("COMPOSE_FILE", OFFLINE_FILE)
    for name in SECRET_NAMES:
        # URL-safe: the passwords go into DATABASE_URL and RABBITMQ_URL unescaped.
        env.setdefault(name, secrets.token_urlsafe(24))
    env["COMPOSE_PROJECT_NAME"] = PROJECT
    env["COMPOSE_FILE"] = "docker-compose.yml" + (f":{OFFLINE_FILE}" if offline else "")
    lines = ["# Written by `make up` (ordermesh-compose): this stack's secrets. Git ignores it."]
    lines += [f"{key}={value}" for key, value in env.items()]
    ENV_FILE.touch(mode=0o600)
    ENV_FILE.chmod(0o600)
    ENV_FILE.write_text("\n".join(lines) + "\n")
    return env


def rabbitmq_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def rabbitmq_definitions(env: dict[str, str]) -> dict[str, object]:
    """The broker's topology plus its users: an admin for the UI, one user per service.

    A service may configure, write and read only the shared exchanges, the dead-letter queue
    and queues named after itself (``order.timeline``): never another service's queue.
    """
    definitions: dict[str, object] = json.loads(DEFINITIONS_TEMPLATE.read_text())
    hashing = "rabbit_password_hashing_sha256"
    users = [
        _user("admin", env["RABBITMQ_ADMIN_PASSWORD"], hashing, tags=["administrator"]),
        *(_user(s, env[f"{s.upper()}_AMQP_PASSWORD"], hashing, tags=[]) for s in SERVICES),
    ]
    everything = {"user": "admin", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
    permissions = [everything, *(_service_permissions(s) for s in SERVICES)]
    return definitions | {"users": users, "permissions": permissions}


def _user(name: str, password: str, hashing: str, *, tags: list[str]) -> dict[str, object]:
    return {
        "name": name,
        "password_hash": rabbitmq_password_hash(password),
        "hashing_algorithm": hashing,
        "tags": tags,
        "limits": {},
    }


def _service_permissions(service: str) -> dict[str, str]:
    own = rf"^(ordermesh\.(events|dlx|dead-letters)|{service}\..*)$"
    return {"user": service, "vhost": "/", "configure": own, "write": own, "read": own}


def write_definitions(env: dict[str, str]) -> None:
    """The generated definitions file that docker-compose.yml mounts into RabbitMQ."""
    DEFINITIONS_FILE.parent.mkdir(parents=True, exist_ok=True)
    # Readable by the broker's user in the container; it holds salted hashes, not passwords.
    DEFINITIONS_FILE.write_text(json.dumps(rabbitmq_definitions(env), indent=2) + "\n")
    DEFINITIONS_FILE.chmod(0o644)


def registry_reachable(timeout: float = 4.0) -> bool:
    """True when Docker Hub's registry answers at all (ORDERMESH_OFFLINE=1/0 decides instead)."""
    forced = os.environ.get("ORDERMESH_OFFLINE")
    if forced in ("0", "1"):
        return forced == "0"
    try:
        urllib.request.urlopen(REGISTRY_PROBE, timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


@functools.cache
def compose_command() -> list[str]:
    """``docker compose`` when the v2 plugin is there, else ``docker-compose`` (v1).

    Asked once per process: every compose command goes through here.
    """
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if v2.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("docker compose not found: apt-get install docker-compose (or the v2 plugin)")


def compose_environment() -> dict[str, str]:
    """The environment compose commands run in: the shell's, without the stack's secrets.

    Compose prefers a shell variable to the one in .env. A SERVICE_TOKEN_SECRET left in a
    shell (the local stack's, sourced for a test run) would reach only the containers that
    command starts: a payment replica added by ``scale`` would then refuse every token the
    running order service signs. .env is the one source of the stack's secrets.
    """
    return {name: value for name, value in os.environ.items() if name not in SECRET_NAMES}


def compose(
    *args: str, check: bool = True, capture: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a compose command in the repository root (so it reads .env)."""
    return subprocess.run(
        [*compose_command(), *args],
        cwd=ROOT,
        env=compose_environment(),
        check=check,
        text=True,
        capture_output=capture,
    )


def running() -> bool:
    """True when the compose stack has at least one running container."""
    if not ENV_FILE.exists() or shutil.which("docker") is None:
        return False
    result = compose("ps", "-q", check=False, capture=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def container_ids(service: str | None = None) -> list[str]:
    """The ids of the stack's containers (of one service when given)."""
    result = compose("ps", "-q", *([service] if service else []), capture=True)
    return result.stdout.split()


def health_states() -> dict[str, str]:
    """container name -> health (or plain state for containers without a healthcheck)."""
    ids = container_ids()
    if not ids:
        return {}
    fmt = "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
    out = subprocess.run(
        ["docker", "inspect", "-f", fmt, *ids], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.lstrip("/").split(" ", 1) for line in out.splitlines() if line)


def wait_healthy(timeout: float) -> dict[str, str]:
    """Poll until every container is healthy (or running, without a check); show progress."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = health_states()
        waiting = {n: s for n, s in states.items() if s not in ("healthy", "running")}
        line = f"\r{len(states) - len(waiting)}/{len(states)} healthy"
        line += f" - waiting: {', '.join(f'{n} {s}' for n, s in sorted(waiting.items()))}" * bool(
            waiting
        )
        print(line[:160].ljust(160), end="", file=sys.stderr, flush=True)
        if states and not waiting:
            break
        time.sleep(2)
    print(file=sys.stderr)
    return states


def _scale_flags(values: list[str]) -> list[str]:
    flags = []
    for value in values:
        service, _, count = value.partition("=")
        if service not in SERVICES or not count.isdigit() or not 1 <= int(count) <= 9:
            raise SystemExit(f"--scale expects SERVICE=N with N in 1..9, got {value!r}")
        flags += ["--scale", value]
    return flags


def leftover_volumes() -> list[str]:
    """This project's data volumes that exist already (from an earlier stack)."""
    result = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return sorted(result.stdout.split())


def cmd_up(args: argparse.Namespace) -> int:
    """Secrets, images when offline, then up and wait."""
    scale = _scale_flags(args.scale)
    volumes = [] if ENV_FILE.exists() else leftover_volumes()
    if volumes:
        # New passwords would not open a database initialised with the old ones.
        print(
            f"data volumes of an earlier stack exist ({', '.join(volumes)}) but .env, which holds"
            f" their passwords, does not: restore .env, or delete them with"
            f" `docker volume rm {' '.join(volumes)}` (their data is lost)"
        )
        return 1
    offline = not registry_reachable()
    env = ensure_env(offline=offline)
    write_definitions(env)
    if offline:
        print("no container registry answers: building every image here (make images)")
        subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=ROOT, check=True)
    started = time.monotonic()
    compose("up", "-d", "--no-build" if offline else "--build", *scale)
    states = wait_healthy(args.timeout)
    unhealthy = sorted(n for n, s in states.items() if s not in ("healthy", "running"))
    if unhealthy or not states:
        print(f"NOT HEALTHY: {', '.join(unhealthy) or 'no containers'} (docker logs <name>)")
        return 1
    print(f"every container is healthy ({time.monotonic() - started:.0f} s after `up`):")
    print(compose("ps", capture=True).stdout, end="")
    order, rabbit, consul = (
        published_port(*where) for where in (("order", 8000), ("rabbitmq", 15672), ("consul", 8500))
    )
    print(f"order API: http://localhost:{order}  (try: curl -s localhost:{order}/health/ready)")
    print(
        f"RabbitMQ UI: http://127.0.0.1:{rabbit} (admin; password RABBITMQ_ADMIN_PASSWORD in .env)"
    )
    print(f"Consul UI: http://127.0.0.1:{consul}/ui" + " (the API double: no UI)" * offline)
    return 0


def published_port(service: str, port: int) -> str:
    """The host port ``service``'s ``port`` is published on, as compose itself reports it
    (``ORDER_PORT`` and the others, from the shell or .env, already applied)."""
    answer = compose("port", service, str(port), check=False, capture=True).stdout.strip()
    return answer.rpartition(":")[2] or "?"


def cmd_down(args: argparse.Namespace) -> int:
    """Stop and remove the containers; data volumes stay."""
    if not ENV_FILE.exists():
        print("the compose stack was never started here (no .env)")
        return 0
    compose("down", "--remove-orphans")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    """Stop the stack and delete its volumes: databases, queues and etcd start empty again."""
    if not ENV_FILE.exists():
        print("the compose stack was never started here (no .env)")
        return 0
    compose("down", "--volumes", "--remove-orphans")
    print("compose data wiped; `make up` starts it again with the demo data")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The stack's containers and their health."""
    if not running():
        print("the compose stack is not running")
        return 1
    print(compose("ps", capture=True).stdout, end="")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """Follow the stack's logs (Ctrl-C stops)."""
    with contextlib.suppress(KeyboardInterrupt):
        compose("logs", "-f", "--tail", str(args.tail), *args.services, check=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``ordermesh-compose`` command line."""
    parser = argparse.ArgumentParser(
        prog="ordermesh-compose",
        description="Run the Ordermesh platform with Docker Compose (offline images when needed).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="write .env if missing, build images offline, start, wait")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for health")
    up.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="run N replicas of SERVICE (compose --scale), e.g. --scale payment=3",
    )
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the stack (data kept)").set_defaults(func=cmd_down)
    sub.add_parser("reset", help="stop the stack and delete its data").set_defaults(func=cmd_reset)
    sub.add_parser("status", help="the containers and their health").set_defaults(func=cmd_status)
    logs = sub.add_parser("logs", help="follow the logs (of some services only, when named)")
    logs.add_argument("services", nargs="*", help="e.g. order payment")
    logs.add_argument("--tail", type=int, default=50, help="lines of history first (default 50)")
    logs.set_defaults(func=cmd_logs)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ordermesh-compose``."""
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
