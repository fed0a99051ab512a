"""Which stack is running, and where its parts answer: the tools' one source of ports and secrets.

``find()`` picks the stack a tool acts on: the one ``--target`` names, else the local stack
when its supervisord runs (``make dev``), else the compose stack when it has a running
container (``make up``). What it returns answers each tool's questions with nothing copied by
hand: the order API, each service's database (compose: the read-only ``ordermesh_audit``
role), the AMQP URL (compose: the ``admin`` user), the admin token, and every instance's URL
(compose: one per replica, ``payment-2`` being compose's container number 2).

    python -m ordermesh_deploy.stacks status     # make status: what runs, and where
    python -m ordermesh_deploy.stacks down       # make down: stop it (data kept)
    python -m ordermesh_deploy.stacks reset      # make reset: wipe the data, start it reseeded

>>> stack = find()
>>> stack.kind, stack.order_url, stack.instances["payment-1"]
('compose', 'http://127.0.0.1:8000', 'http://127.0.0.1:32797')
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import asyncpg

from ordermesh_deploy import compose, local

T = TypeVar("T")
Kind = Literal["local", "compose"]
KINDS: tuple[Kind, ...] = ("local", "compose")
APP_SERVICES = tuple(local.SERVICES)
NO_STACK = (
    "no stack is running: start one with `make dev` (local processes) or `make up` (docker compose)"
)
LOCAL_DOWN = "the local stack is not running: start it with `make dev`"
COMPOSE_DOWN = "the compose stack is not running: start it with `make up`"
# The queues (and dead-letter queue) a stack's services declare: the rule compose's
# RabbitMQ permissions use too (deploy/ordermesh_deploy/compose.py).
STACK_QUEUE = re.compile(rf"^(ordermesh\.dead-letters|({'|'.join(APP_SERVICES)})\..+)$")


class StackError(Exception):
    """A stack that is not there, or a part of it that is not, said in one line."""


def choose(target: Kind | None, *, local_running: bool, compose_running: bool) -> Kind:
    """The stack to act on: ``target`` when given (it must run), else local, else compose."""
    if target == "local" and not local_running:
        raise StackError(LOCAL_DOWN)
    if target == "compose" and not compose_running:
        raise StackError(COMPOSE_DOWN)
    if target is not None:
        return target
    if local_running:
        return "local"
    if compose_running:
        return "compose"
    raise StackError(NO_STACK)


class Endpoints(Protocol):
    """What the tools need from a running stack, as reached from this host."""

    @property
    def kind(self) -> Kind:
        """``local`` or ``compose``."""
        ...

    @property
    def order_url(self) -> str:
        """The order API's base URL."""
        ...

    @property
    def databases(self) -> dict[str, str]:
        """service -> DSN of its database (compose: the read-only auditor's login)."""
        ...

    @property
    def amqp_url(self) -> str:
        """The broker, with the events exchange, as a user that may declare a queue."""
        ...

    @property
    def admin_token(self) -> str:
        """The services' ``X-Admin-Token``."""
        ...

    @property
    def instances(self) -> dict[str, str]:
        """``<service>-<n>`` -> base URL, for every instance (replica) of the four services."""
        ...

    @property
    def etcd_url(self) -> str:
        """etcd's v3 gateway (elections, locks)."""
        ...

    def refresh(self) -> Endpoints:
        """The same stack as it is now (a restarted container publishes new host ports)."""
        ...


# --- the local stack -------------------------------------------------------------------------


def local_databases(stack: local.Stack) -> dict[str, str]:
    """Each service's DSN in a local stack."""
    server = stack.postgres_url.rstrip("/")
    return {s: f"{server}/{stack.db_prefix}_{s}" for s in APP_SERVICES}


@dataclass(frozen=True)
class LocalEndpoints:
    """The local stack, from its ``stack.json`` and ``supervisord.conf``."""

    stack: local.Stack
    kind: Kind = "local"

    @property
    def order_url(self) -> str:
        return self.stack.instances["order-1"]

    @property
    def databases(self) -> dict[str, str]:
        return local_databases(self.stack)

    @property
    def amqp_url(self) -> str:
        vhost = self.stack.rabbitmq_vhost
        url = self.stack.rabbitmq_url
        return local.with_vhost(url, vhost) if vhost else url

    @property
    def admin_token(self) -> str:
        # The token the services were started with (`up` generates one into secrets.env).
        conf = self.stack.conf.read_text() if self.stack.conf.exists() else ""
        match = re.search(r'ADMIN_TOKEN="([^"]*)"', conf)
        if match is None:
            raise StackError(f"no ADMIN_TOKEN in {self.stack.conf}: restart the stack (make dev)")
        return match.group(1)

    @property
    def instances(self) -> dict[str, str]:
        return dict(self.stack.instances)

    @property
    def etcd_url(self) -> str:
        return self.stack.etcd_url

    def refresh(self) -> LocalEndpoints:
        return self


# --- the compose stack -----------------------------------------------------------------------

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"


@dataclass(frozen=True)
class Container:
    """One container of the compose project, from ``docker inspect``."""

    id: str
    project: str
    service: str
    number: int
    state: str  # running, paused, exited, restarting...
    health: str = ""  # healthy, starting, unhealthy; empty without a healthcheck
    ports: dict[int, int] = field(default_factory=dict)  # container port -> host port
    networks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # network -> aliases
    addresses: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``payment-2``: compose's service and container number (``--index 2``)."""
        return f"{self.service}-{self.number}"

    @property
    def up(self) -> bool:
        """Running or paused: it has its ports and its network."""
        return self.state in ("running", "paused")

    def url(self, port: int = 8000) -> str | None:
        """``http://127.0.0.1:<host port>`` of a published container port."""
        host_port = self.ports.get(port)
        return f"http://127.0.0.1:{host_port}" if host_port and self.up else None


def parse_container(info: dict[str, Any]) -> Container | None:
    """A container from one ``docker inspect`` object; None for compose's one-off containers."""
    labels = info["Config"].get("Labels") or {}
    if SERVICE_LABEL not in labels or labels.get(ONEOFF_LABEL) == "True":
        return None
    settings = info.get("NetworkSettings") or {}
    networks = settings.get("Networks") or {}
    return Container(
        id=info["Id"],
        project=labels.get(PROJECT_LABEL, ""),
        service=labels[SERVICE_LABEL],
        number=int(labels.get(NUMBER_LABEL, "1")),
        state=info["State"]["Status"],
        health=(info["State"].get("Health") or {}).get("Status", ""),
        ports=_published(settings.get("Ports") or {}),
        networks={name: tuple(net.get("Aliases") or ()) for name, net in networks.items()},
        addresses=tuple(net["IPAddress"] for net in networks.values() if net.get("IPAddress")),
        env=dict(item.split("=", 1) for item in info["Config"].get("Env") or [] if "=" in item),
    )


def _published(ports: dict[str, list[dict[str, str]] | None]) -> dict[int, int]:
    published = {}
    for spec, bindings in ports.items():
        port, _, protocol = spec.partition("/")
        if bindings and protocol == "tcp":
            published[int(port)] = int(bindings[0]["HostPort"])
    return published


def inspect_containers(ids: Iterable[str]) -> list[Container]:
    """The containers with these ids (ones removed meanwhile are left out), by name."""
    ids = list(ids)
    if not ids:
        return []
    result = subprocess.run(
        ["docker", "inspect", *ids], capture_output=True, text=True, check=False
    )
    parsed = (parse_container(info) for info in json.loads(result.stdout or "[]"))
    return sorted((c for c in parsed if c is not None), key=lambda c: (c.service, c.number))


def compose_containers() -> list[Container]:
    """The compose project's containers in any state; [] where compose has none here."""
    if not compose.ENV_FILE.exists() or shutil.which("docker") is None:
        return []
    try:
        # `ps -a`: compose v2 lists running containers only without it.
        result = compose.compose("ps", "-a", "-q", check=False, capture=True)
    except SystemExit:  # compose_command() found no compose tool: then no compose stack
        return []
    return inspect_containers(result.stdout.split()) if result.returncode == 0 else []


def project_containers(project: str) -> list[Container]:
    """The containers labelled with a compose project (a second's faster than compose ps)."""
    result = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={PROJECT_LABEL}={project}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return inspect_containers(result.stdout.split())


@dataclass(frozen=True)
class ComposeEndpoints:
    """The compose stack: ports from its containers, secrets as they were started with.

    Published ports come from ``docker inspect`` of the project's containers (the same numbers
    ``compose port --index N`` prints, without a compose run of a second or more per port).
    """

    containers: list[Container]
    dotenv: dict[str, str] = field(default_factory=dict)
    kind: Kind = "compose"

    def host_port(self, service: str, port: int) -> int:
        """The host port of ``service``'s first running container's ``port``."""
        for container in self.containers:
            if container.service == service and container.up and port in container.ports:
                return container.ports[port]
        raise StackError(
            f"the compose stack's {service} publishes no port {port}: is it running? (make status)"
        )

    def secret(self, name: str, *, service: str) -> str:
        """``name`` as ``service``'s container got it, else from ``.env``."""
        for container in self.containers:
            if container.service == service and name in container.env:
                return container.env[name]
        if name in self.dotenv:
            return self.dotenv[name]
        raise StackError(f"{name} is not in .env: `make up` writes it")

    @property
    def order_url(self) -> str:
        return f"http://127.0.0.1:{self.host_port('order', 8000)}"

    @property
    def databases(self) -> dict[str, str]:
        port = self.host_port("postgres", 5432)
        password = quote(self.secret("AUDIT_DB_PASSWORD", service="postgres"), safe="")
        login = f"ordermesh_audit:{password}@127.0.0.1:{port}"
        return {s: f"postgresql://{login}/ordermesh_{s}" for s in APP_SERVICES}

    @property
    def amqp_url(self) -> str:
        port = self.host_port("rabbitmq", 5672)
        password = quote(self.secret("RABBITMQ_ADMIN_PASSWORD", service="rabbitmq"), safe="")
        return f"amqp://admin:{password}@127.0.0.1:{port}/"

    @property
    def admin_token(self) -> str:
        return self.secret("ADMIN_TOKEN", service="order")

    @property
    def instances(self) -> dict[str, str]:
        urls = {c.name: c.url(8000) for c in self.containers if c.service in APP_SERVICES}
        return {name: url for name, url in urls.items() if url}

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.host_port('etcd', 2379)}"

    @property
    def project(self) -> str:
        """The compose project's name (``ordermesh`` from .env, unless overridden)."""
        return self.containers[0].project if self.containers else ""

    def refresh(self) -> ComposeEndpoints:
        return ComposeEndpoints(project_containers(self.project), self.dotenv)


# --- finding the stack -----------------------------------------------------------------------


def find(target: Kind | None = None, *, run_dir: Path = Path(".run")) -> Endpoints:
    """The running stack (``target`` when given); raises StackError naming what to start."""
    local_running = target != "compose" and local.supervisord_running(run_dir)
    # Asking compose takes a second or two: only when the answer can matter.
    asks_compose = target == "compose" or (target is None and not local_running)
    containers = compose_containers() if asks_compose else []
    kind = choose(
        target,
        local_running=local_running,
        compose_running=any(c.state == "running" for c in containers),
    )
    if kind == "compose":
        return ComposeEndpoints(containers, compose.read_env())
    stack = local.Stack.load(run_dir)
    if stack is None:
        raise StackError(f"{LOCAL_DOWN} (no stack.json in {run_dir})")
    return LocalEndpoints(stack)


def find_or_exit(target: Kind | None = None, *, run_dir: Path = Path(".run")) -> Endpoints:
    """``find()`` for a command line: a missing stack ends the program with its one line."""
    try:
        return find(target, run_dir=run_dir)
    except StackError as exc:
        raise SystemExit(str(exc)) from None


def or_exit(part: Callable[[], T]) -> T:
    """``part()`` for a command line: a part of the stack that is not there ends the program
    with its one line, e.g. ``or_exit(lambda: stack.databases)``."""
    try:
        return part()
    except StackError as exc:
        raise SystemExit(str(exc)) from None


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target`` and ``--run-dir``, the same in every tool."""
    parser.add_argument(
        "--target",
        choices=KINDS,
        default=None,
        help="the stack to act on (default: the local one if `make dev` runs, else compose)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path(".run"),
        help="the local stack's run dir (default .run)",
    )


# --- status, down, reset ---------------------------------------------------------------------


def compose_status(containers: list[Container]) -> str:
    """One line per container: name, state (health), what it publishes on this host."""
    lines = []
    for c in containers:
        state = c.health if c.health and c.state == "running" else c.state
        ports = sorted(c.ports.items()) if c.up else []
        published = ", ".join(f"127.0.0.1:{host}->{port}" for port, host in ports)
        lines.append(f"  {c.name:<14} {state:<10} {published}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """What runs and where."""
    stack = find_or_exit(args.target, run_dir=args.run_dir)
    if isinstance(stack, LocalEndpoints):
        print(f"local stack (run dir {args.run_dir}):")
        print(local.ctl(stack.stack, "status", check=False).stdout, end="")
    elif isinstance(stack, ComposeEndpoints):
        print(f"compose stack (project {stack.project}):")
        print(compose_status(stack.containers))
    print(f"order API: {_try(lambda: stack.order_url)}")
    return 0


def _try(part: Callable[[], str]) -> str:
    try:
        return part()
    except StackError as exc:
        return f"none ({exc})"


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the running stack (data kept)."""
    try:
        stack = find(args.target, run_dir=args.run_dir)
    except StackError as exc:
        print(exc)
        return 0
    print(f"stopping the {stack.kind} stack")
    if stack.kind == "local":
        return _local_cli("--run-dir", str(args.run_dir), "down")
    return _compose_cli("down")


def _local_cli(*argv: str) -> int:
    args = local.build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


def _compose_cli(*argv: str) -> int:
    args = compose.build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


def reset_kind(target: Kind | None, run_dir: Path) -> Kind:
    """The stack to reset: the one named (running or not), else the running one."""
    if target is not None:
        return target
    try:
        return find(run_dir=run_dir).kind
    except StackError as exc:
        raise SystemExit(f"{exc}; `make reset TARGET=local|compose` resets a stopped one") from None


def cmd_reset(args: argparse.Namespace) -> int:
    """Wipe the databases and queues, then start the stack again: services reseed on start."""
    if reset_kind(args.target, args.run_dir) == "compose":
        return reset_compose(timeout=args.timeout)
    return reset_local(args.run_dir, timeout=args.timeout)


def reset_compose(*, timeout: float) -> int:
    """``ordermesh-compose reset`` (down with the volumes), then ``up`` with the same replicas.

    The volumes hold PostgreSQL's, RabbitMQ's and etcd's data: all three start empty, so
    etcd's revisions (fencing tokens) restart together with the databases that check them.
    """
    if not compose.ENV_FILE.exists():
        raise SystemExit("the compose stack was never started here (no .env): `make up`")
    scale = [arg for flag in scale_flags(compose_containers()) for arg in ("--scale", flag)]
    _compose_cli("reset")
    return _compose_cli("up", "--timeout", str(timeout), *scale)


def scale_flags(containers: list[Container]) -> list[str]:
    """``payment=3`` for each of the four services running more than one replica."""
    replicas = Counter(c.service for c in containers if c.service in APP_SERVICES)
    return [f"{service}={n}" for service, n in sorted(replicas.items()) if n > 1]


def reset_local(run_dir: Path, *, timeout: float) -> int:
    """Stop the local stack, drop its databases and queues, start it again as it was.

    etcd keeps its data: its revisions are the fencing tokens, and they only ever need to
    grow relative to what the databases have seen. With the databases empty, tokens from
    the old etcd are all new to them; wiping etcd too would gain nothing, and a shared etcd
    (``--etcd-url``) is not this stack's to wipe.
    """
    stack = local.Stack.load(run_dir)
    if stack is None:
        raise SystemExit(f"no local stack was started in {run_dir}: `make dev`")
    if local.supervisord_running(run_dir):
        _local_cli("--run-dir", str(run_dir), "down")
    dropped = asyncio.run(drop_databases(stack))
    print(f"dropped databases: {', '.join(dropped) or 'none'}")
    queues = delete_queues(stack)
    print(f"deleted queues: {', '.join(queues) or 'none'}")
    return _local_cli(*up_arguments(stack), "--timeout", str(timeout))


async def drop_databases(stack: local.Stack) -> list[str]:
    """Drop the stack's ``<prefix>_<service>`` databases (its role created, so owns, them)."""
    conn = await asyncpg.connect(f"{stack.postgres_url.rstrip('/')}/postgres", timeout=5)
    try:
        existing = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        names = [url.rsplit("/", 1)[1] for url in local_databases(stack).values()]
        dropped = [name for name in names if name in existing]
        for name in dropped:
            # FORCE: a connection left behind (an audit, a psql) must not block the reset.
            await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        return dropped
    finally:
        await conn.close()


def delete_queues(stack: local.Stack) -> list[str]:
    """Delete the stack's queues, so no event of the wiped databases is delivered again.

    A stack with a vhost of its own lost it with ``down`` (``up`` creates it afresh); on the
    shared ``/`` only the queues named like the services' (and the dead letters) go.
    """
    if stack.rabbitmq_vhost:
        return []
    try:
        listed = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "-p", "/", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        queues = [name for name in listed if STACK_QUEUE.match(name)]
        for name in queues:
            local.rabbitmqctl("delete_queue", "-p", "/", name)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(
            f"cannot delete the stack's RabbitMQ queues with rabbitmqctl ({exc}):"
            " run `make reset` as root"
        ) from None
    return queues


def up_arguments(stack: local.Stack) -> list[str]:
    """The ``ordermesh-local`` arguments that start ``stack`` again with the same shape."""
    argv = ["--run-dir", stack.run_dir, "up", "--postgres-url", stack.postgres_url]
    argv += ["--rabbitmq-url", stack.rabbitmq_url, "--db-prefix", stack.db_prefix]
    if stack.rabbitmq_vhost:
        argv += ["--rabbitmq-vhost", stack.rabbitmq_vhost]
    if not stack.private_etcd:
        argv += ["--etcd-url", stack.etcd_url]
    replicas = Counter(program.rsplit("-", 1)[0] for program in stack.instances)
    argv += [arg for s, n in replicas.items() if n > 1 for arg in ("--scale", f"{s}={n}")]
    order_port = urlsplit(stack.instances.get("order-1", "")).port
    offset = order_port - local.SERVICES["order"] if order_port else 0
    return argv + (["--port-offset", str(offset)] if offset else [])


def build_parser() -> argparse.ArgumentParser:
    """``python -m ordermesh_deploy.stacks``: make status, make down, make reset."""
    parser = argparse.ArgumentParser(
        prog="python -m ordermesh_deploy.stacks",
        description="make status, make down and make reset: on whichever Ordermesh stack runs"
        " (local or compose).",
    )
    add_target_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="what runs, its state and ports").set_defaults(func=cmd_status)
    sub.add_parser("down", help="stop the stack (data kept)").set_defaults(func=cmd_down)
    reset = sub.add_parser(
        "reset",
        help="wipe the databases and event queues, start again with the demo data"
        " (--target resets a stopped stack too)",
    )
    reset.add_argument(
        "--timeout", type=float, default=300, help="seconds to wait for health (default 300)"
    )
    reset.set_defaults(func=cmd_reset)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m ordermesh_deploy.stacks``."""
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
