"""The local stack: the whole platform as processes on loopback, without Docker.

``ordermesh-local up`` first checks what it needs (the etcd binary when it runs a private
etcd, RabbitMQ and PostgreSQL answering) and names whatever is missing with the command that
fixes it, one line each, within seconds. Then it creates the four databases if missing, starts
a private etcd (unless ``--etcd-url`` is given; Debian's ``etcd-server``, the 3.4 line the
tests use) and the services under supervisord, waits until every instance is ready, and prints
where things are. ``make dev`` runs ``deploy/local/prereqs.sh`` before it, which installs and
starts the servers and keeps the PostgreSQL login in ``.run/local.env``. ``ordermesh-local
down`` stops exactly what ``up`` started. Any single process can be killed and restarted on
its own (``kill``/``restart``), which is what the chaos tools do.

Everything lives in the run directory (default ``.run/``): ``supervisord.conf``, ``stack.json``
(ports, URLs, pids' owner), ``local.env`` (the PostgreSQL login, read when ``POSTGRES_URL`` is
not set), ``logs/<program>.log`` and ``etcd/`` (etcd's data, kept across
restarts so its revisions, used as fencing tokens, never go backwards).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from ordermesh_deploy.etcd_process import EtcdNotFound, etcd_binary

SERVICES = {"order": 8000, "inventory": 8001, "payment": 8002, "shipping": 8003}
# Service settings that `up` hands on to the services when they are set in its environment.
PASS_THROUGH = (
    "ADMIN_TOKEN",
    "DB_POOL_MAX",
    "HEALTH_TIMEOUT",
    "ORDER_WAIT",
    "REGISTRY_TTL",
    "SAGA_DEADLINE",
    "SAGA_LEASE_TTL",
    "SAGA_STEP_TIMEOUT",
)
INSTANCE_PORT_STEP = 10  # payment-2 listens on 8012, payment-3 on 8022...
ETCD_PROGRAM = "etcd"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432"
PROBE_TIMEOUT = 1.5  # seconds per server probed, so a missing one is named within ~5 s
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_FRAME_METHOD = b"\x01"


@dataclass
class Stack:
    """What ``up`` started, saved as ``stack.json`` for ``down``, the tests and chaos tools."""

    run_dir: str
    postgres_url: str
    rabbitmq_url: str
    etcd_url: str
    private_etcd: bool
    etcd_peer_port: int = 0
    db_prefix: str = "ordermesh"
    rabbitmq_vhost: str = ""  # created by `up` (and deleted by `down`) when set
    instances: dict[str, str] = field(default_factory=dict)  # program -> base URL

    @property
    def conf(self) -> Path:
        """supervisord's config file."""
        return Path(self.run_dir) / "supervisord.conf"

    def save(self) -> None:
        """Write ``stack.json``."""
        (Path(self.run_dir) / "stack.json").write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Stack | None:
        """The last saved stack, or None."""
        path = run_dir / "stack.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _bin(name: str) -> str:
    # supervisord/supervisorctl live beside this interpreter in the project's venv.
    return str(Path(sys.executable).parent / name)


def plan_instances(scale: dict[str, int], *, port_offset: int = 0) -> dict[str, tuple[str, int]]:
    """program name -> (service, port) for every instance to run."""
    plan = {}
    for service, base in SERVICES.items():
        for n in range(1, scale.get(service, 1) + 1):
            port = port_offset + base + INSTANCE_PORT_STEP * (n - 1)
            plan[f"{service}-{n}"] = (service, port)
    return plan


def supervisor_conf(stack: Stack, plan: dict[str, tuple[str, int]], log_level: str) -> str:
    """supervisord.conf for the stack: one program per instance, plus etcd when private."""
    run = Path(stack.run_dir).resolve()
    parts = [
        f"[unix_http_server]\nfile={run}/supervisor.sock\n",
        f"[supervisord]\nlogfile={run}/logs/supervisord.log\npidfile={run}/supervisord.pid\n"
        f"directory={run}\nidentifier=ordermesh-local\n",
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        f"[supervisorctl]\nserverurl=unix://{run}/supervisor.sock\n",
    ]
    if stack.private_etcd:
        parts.append(_program(ETCD_PROGRAM, _etcd_command(stack), {}, run, priority=10))
    for program, (service, port) in plan.items():
        env = _service_env(stack, service, port, log_level)
        parts.append(_program(program, f"{sys.executable} -m {service}", env, run, priority=50))
    return "\n".join(parts)


def _program(name: str, command: str, env: dict[str, str], run: Path, *, priority: int) -> str:
    environment = ",".join(f'{k}="{v}"' for k, v in env.items())
    lines = [
        f"[program:{name}]",
        f"command={command}",
        f"priority={priority}",
        "autostart=true",
        # Like a container restart policy: a killed process comes back by itself.
        "autorestart=true",
        "startsecs=1",
        "startretries=100",
        "stopsignal=TERM",
        "stopwaitsecs=15",
        "stopasgroup=true",
        "killasgroup=true",
        "redirect_stderr=true",
        f"stdout_logfile={run}/logs/{name}.log",
        "stdout_logfile_maxbytes=20MB",
        "stdout_logfile_backups=2",
    ]
    if environment:
        lines.append(f"environment={environment}")
    return "\n".join(lines) + "\n"


def _etcd_command(stack: Stack) -> str:
    client = stack.etcd_url
    peer = f"http://127.0.0.1:{stack.etcd_peer_port}"
    data = Path(stack.run_dir).resolve() / "etcd"
    return (
        f"{etcd_binary()} --name ordermesh --data-dir {data} --listen-client-urls {client}"
        f" --advertise-client-urls {client} --listen-peer-urls {peer}"
        f" --initial-advertise-peer-urls {peer} --initial-cluster ordermesh={peer}"
        " --log-level warn"
    )


def _service_env(stack: Stack, service: str, port: int, log_level: str) -> dict[str, str]:
    return {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": f"{stack.postgres_url.rstrip('/')}/{stack.db_prefix}_{service}",
        "RABBITMQ_URL": with_vhost(stack.rabbitmq_url, stack.rabbitmq_vhost)
        if stack.rabbitmq_vhost
        else stack.rabbitmq_url,
        "REGISTRY": "etcd",
        "ETCD_URL": stack.etcd_url,
        "LOG_LEVEL": log_level,
    } | {name: os.environ[name] for name in PASS_THROUGH if name in os.environ}


async def ensure_databases(postgres_url: str, prefix: str = "ordermesh") -> list[str]:
    """Create ``<prefix>_<service>`` databases that do not exist yet; returns those created."""
    conn = await asyncpg.connect(f"{postgres_url.rstrip('/')}/postgres", timeout=5)
    try:
        existing = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        created = []
        for service in SERVICES:
            name = f"{prefix}_{service}"
            if name not in existing:
                await conn.execute(f'CREATE DATABASE "{name}"')
                created.append(name)
        return created
    finally:
        await conn.close()


def local_postgres_url(run_dir: Path) -> str | None:
    """``POSTGRES_URL`` from ``<run dir>/local.env``, where ``deploy/local/prereqs.sh`` keeps
    the local stack's PostgreSQL login; None without that file or line."""
    try:
        lines = (run_dir / "local.env").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition("=")
        if name == "POSTGRES_URL" and value:
            return value.strip()
    return None


def redact(url: str) -> str:
    """``url`` with its password shown as ``***`` (for messages)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def missing_prerequisites(stack: Stack) -> list[str]:
    """One line per server or binary ``up`` needs that is not there, with the command that
    fixes it; empty when everything is in place."""
    problems = [
        _etcd_missing(stack),
        _rabbitmq_missing(stack.rabbitmq_url),
        asyncio.run(_postgres_missing(stack.postgres_url)),
    ]
    return [problem for problem in problems if problem]


def _etcd_missing(stack: Stack) -> str | None:
    if not stack.private_etcd:
        return None
    try:
        etcd_binary()
    except EtcdNotFound as exc:
        return str(exc)
    return None


def _rabbitmq_missing(url: str) -> str | None:
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 5672)
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT) as sock:
            if parts.scheme == "amqps":
                return None  # TLS first: a connection is all this checks
            sock.sendall(_AMQP_HEADER)
            # A broker that serves answers the protocol header with Connection.Start.
            reason = None if sock.recv(1) == _FRAME_METHOD else "no AMQP answer"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    if reason is None:
        return None
    return (
        f"RabbitMQ not answering at {address[0]}:{address[1]} ({reason}): `make deps` as root "
        "installs and starts it (`rabbitmq-server -detached`), or pass --rabbitmq-url"
    )


async def _postgres_missing(postgres_url: str) -> str | None:
    where = redact(postgres_url)
    try:
        conn = await asyncpg.connect(f"{postgres_url.rstrip('/')}/postgres", timeout=PROBE_TIMEOUT)
    except OSError as exc:
        return (
            f"PostgreSQL not reachable at {where} ({exc}): `make deps` as root installs and "
            "starts it, or pass --postgres-url"
        )
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return (
            f"PostgreSQL refused {where} ({exc}): `make deps` as root creates the role "
            "ordermesh and .run/local.env, which make passes on as POSTGRES_URL"
        )
    await conn.close()
    return None


def ctl(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run supervisorctl against the stack's supervisord."""
    return subprocess.run(
        [_bin("supervisorctl"), "-c", str(stack.conf), *args],
        capture_output=True,
        text=True,
        check=check,
    )


def supervisord_running(run_dir: Path) -> bool:
    """True if the stack's supervisord process is alive."""
    pidfile = run_dir / "supervisord.pid"
    if not pidfile.exists():
        return False
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


async def wait_ready(instances: dict[str, str], within: float) -> dict[str, str]:
    """Poll every instance's /health/ready until all answer 200; returns the last states."""
    states = dict.fromkeys(instances, "starting")
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            await asyncio.gather(*(_probe(client, p, u, states) for p, u in instances.items()))
            _progress(states)
            if all(s == "ready" for s in states.values()):
                break
            await asyncio.sleep(0.5)
    print(file=sys.stderr)
    return states


async def _probe(client: httpx.AsyncClient, program: str, url: str, states: dict[str, str]) -> None:
    try:
        response = await client.get(f"{url}/health/ready")
    except httpx.HTTPError:
        states[program] = "starting"
        return
    if response.status_code == 200:
        states[program] = "ready"
        return
    checks = response.json().get("checks", {})
    failing = [f"{k}: {v}" for k, v in checks.items() if v != "ok"]
    states[program] = "waiting (" + "; ".join(failing)[:80] + ")"


def _progress(states: dict[str, str]) -> None:
    ready = sum(s == "ready" for s in states.values())
    waiting = ", ".join(f"{p} {s}" for p, s in states.items() if s != "ready")
    line = f"\r{ready}/{len(states)} ready" + (f" - {waiting}" if waiting else "")
    print(line[:160].ljust(160), end="", file=sys.stderr, flush=True)


def _parse_scale(values: list[str]) -> dict[str, int]:
    scale = {}
    for value in values:
        service, _, count = value.partition("=")
        if service not in SERVICES or not count.isdigit() or not 1 <= int(count) <= 9:
            raise SystemExit(f"--scale expects SERVICE=N with N in 1..9, got {value!r}")
        scale[service] = int(count)
    return scale


def rabbitmqctl(*args: str) -> None:
    """Run rabbitmqctl against the local broker (a private vhost needs its CLI)."""
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def with_vhost(url: str, vhost: str) -> str:
    """The AMQP URL pointed at ``vhost``."""
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{vhost}"


def create_vhost(vhost: str) -> None:
    """A private virtual host: this stack's exchange and queues, apart from any other."""
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def cmd_up(args: argparse.Namespace) -> int:
    """Start the stack and wait until it is ready."""
    run_dir = Path(args.run_dir)
    if supervisord_running(run_dir):
        print(f"the local stack is already running (run dir {run_dir}); `make down` stops it")
        return 1
    plan = plan_instances(_parse_scale(args.scale), port_offset=args.port_offset)
    busy = [f"{p} (port {port})" for p, (_s, port) in plan.items() if port_in_use(port)]
    if busy:
        print(f"ports already in use: {', '.join(busy)}; stop whatever listens there first")
        return 1
    stack = _new_stack(args, run_dir)
    missing = missing_prerequisites(stack)
    if missing:
        print("\n".join(missing))
        return 1
    created = asyncio.run(_prepare_databases(stack.postgres_url, stack.db_prefix))
    if created is None:
        return 1
    for program, (_service, port) in plan.items():
        stack.instances[program] = f"http://127.0.0.1:{port}"
    if stack.rabbitmq_vhost:
        create_vhost(stack.rabbitmq_vhost)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    stack.conf.write_text(supervisor_conf(stack, plan, args.log_level))
    stack.save()
    subprocess.run([_bin("supervisord"), "-c", str(stack.conf)], check=True)
    print(f"started {len(plan)} service instances" + (" and etcd" if stack.private_etcd else ""))
    states = asyncio.run(wait_ready(stack.instances, args.timeout))
    return _report(stack, states)


async def _prepare_databases(postgres_url: str, prefix: str) -> list[str] | None:
    try:
        created = await ensure_databases(postgres_url, prefix)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"cannot create the databases on {redact(postgres_url)}: {exc}")
        return None
    if created:
        print(f"created databases: {', '.join(created)}")
    return created


def _new_stack(args: argparse.Namespace, run_dir: Path) -> Stack:
    previous = Stack.load(run_dir)
    private = not args.etcd_url
    if private and previous is not None and previous.private_etcd:
        # etcd's data dir remembers its peer URL: reuse the ports it was created with.
        etcd_url, peer = previous.etcd_url, previous.etcd_peer_port
    elif private:
        etcd_url, peer = f"http://127.0.0.1:{free_port()}", free_port()
    else:
        etcd_url, peer = args.etcd_url, 0
    return Stack(
        run_dir=str(run_dir),
        postgres_url=args.postgres_url or local_postgres_url(run_dir) or DEFAULT_POSTGRES_URL,
        rabbitmq_url=args.rabbitmq_url,
        etcd_url=etcd_url,
        private_etcd=private,
        etcd_peer_port=peer,
        db_prefix=args.db_prefix,
        rabbitmq_vhost=args.rabbitmq_vhost,
    )


def _report(stack: Stack, states: dict[str, str]) -> int:
    logs = Path(stack.run_dir) / "logs"
    not_ready = {p: s for p, s in states.items() if s != "ready"}
    if not_ready:
        for program, state in not_ready.items():
            print(f"NOT READY {program}: {state} (log: {logs}/{program}.log)")
        print("the stack is still running; `make down` stops it")
        return 1
    print("every service is ready:")
    for program, url in stack.instances.items():
        print(f"  {program:<12} {url}")
    print(
        f"order API: {stack.instances['order-1']}  (try: curl -s {stack.instances['order-1']}"
        "/health/ready)"
    )
    print(f"etcd:      {stack.etcd_url}{' (private)' if stack.private_etcd else ''}")
    print(f"logs:      {logs}/")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop supervisord and everything it runs; leave data in place."""
    run_dir = Path(args.run_dir)
    stack = Stack.load(run_dir)
    if stack is None or not supervisord_running(run_dir):
        print("the local stack is not running")
        return 0
    pid = int((run_dir / "supervisord.pid").read_text().strip())
    ctl(stack, "shutdown", check=False)
    deadline = time.monotonic() + 30
    while supervisord_running(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    if supervisord_running(run_dir):
        os.kill(pid, signal.SIGKILL)
    if stack.rabbitmq_vhost:
        rabbitmqctl("delete_vhost", stack.rabbitmq_vhost)
    print("the local stack is stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show each process's state (supervisorctl status)."""
    stack = Stack.load(Path(args.run_dir))
    if stack is None or not supervisord_running(Path(args.run_dir)):
        print("the local stack is not running")
        return 1
    print(ctl(stack, "status", check=False).stdout, end="")
    return 0


def cmd_signal(args: argparse.Namespace) -> int:
    """Send a signal to one program (KILL for a crash, STOP/CONT for a pause)."""
    stack = Stack.load(Path(args.run_dir))
    if stack is None:
        print("the local stack is not running")
        return 1
    result = ctl(stack, "signal", args.signal, args.program, check=False)
    print(result.stdout.strip() or result.stderr.strip())
    return 0 if "ERROR" not in result.stdout else 1


def cmd_restart(args: argparse.Namespace) -> int:
    """Restart one program through supervisord."""
    stack = Stack.load(Path(args.run_dir))
    if stack is None:
        print("the local stack is not running")
        return 1
    result = ctl(stack, "restart", args.program, check=False)
    print(result.stdout.strip())
    return 0 if "ERROR" not in result.stdout else 1


def _identifier(value: str) -> str:
    if value and (not value.replace("_", "").isalnum() or not value[0].isalpha()):
        raise argparse.ArgumentTypeError(f"{value!r}: letters, digits and _ only")
    return value.lower()


def build_parser() -> argparse.ArgumentParser:
    """The ``ordermesh-local`` command line."""
    parser = argparse.ArgumentParser(
        prog="ordermesh-local", description="Run the Ordermesh platform as local processes."
    )
    parser.add_argument("--run-dir", default=".run", help="state, config and logs (default .run)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack and wait until every service is ready")
    up.add_argument(
        "--postgres-url",
        default=os.environ.get("POSTGRES_URL") or None,
        help="server DSN without a database, for a role that may create databases (default:"
        " env POSTGRES_URL, else the one `make deps` wrote to <run dir>/local.env, else"
        " postgres@127.0.0.1:5432 with no password)",
    )
    up.add_argument(
        "--rabbitmq-url",
        default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        help="AMQP URL (env RABBITMQ_URL)",
    )
    up.add_argument(
        "--db-prefix",
        default="ordermesh",
        type=_identifier,
        help="databases are <prefix>_<service> (default ordermesh)",
    )
    up.add_argument(
        "--rabbitmq-vhost",
        default="",
        type=_identifier,
        help="create this virtual host for the stack (deleted by `down`); needs rabbitmqctl",
    )
    up.add_argument(
        "--etcd-url",
        default=os.environ.get("ETCD_URL", ""),
        help="use this etcd instead of starting a private one (env ETCD_URL)",
    )
    up.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="run N instances of SERVICE (ports base, base+10, ...)",
    )
    up.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="add this to every service port (e.g. 20000 for a second stack)",
    )
    up.add_argument("--timeout", type=float, default=60, help="seconds to wait for readiness")
    up.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop everything `up` started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show each process's state").set_defaults(func=cmd_status)
    sig = sub.add_parser("signal", help="send a signal to one program, e.g. KILL payment-1")
    sig.add_argument("signal", choices=["KILL", "TERM", "STOP", "CONT"])
    sig.add_argument("program", help="e.g. payment-1, order-1, etcd")
    sig.set_defaults(func=cmd_signal)
    restart = sub.add_parser("restart", help="restart one program, e.g. payment-1")
    restart.add_argument("program")
    restart.set_defaults(func=cmd_restart)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ordermesh-local``."""
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
