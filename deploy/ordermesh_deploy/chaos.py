"""Chaos on purpose: kill, pause and restart parts of the platform, then check the books.

Acts on the local stack (processes under supervisord: SIGKILL, SIGSTOP/SIGCONT, restart) or
on the docker compose stack (containers: kill, pause/unpause, restart, stop/start). Every
action is printed with a timestamp. Scenarios run load + fault + heal + audit.

    ordermesh-chaos kill payment-1                  # local stack (.run/)
    ordermesh-chaos pause inventory-1 --for 6       # SIGSTOP, then SIGCONT after 6 s
    ordermesh-chaos --target compose kill payment
    ordermesh-chaos fault payment-1 --error-rate 0.5 --latency-ms 200
    ordermesh-chaos random --every 4 --for 40 --seed 7
    ordermesh-chaos scenario kill-payment           # or: scenario all
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from ordermesh_shared.etcd import EtcdClient
from ordermesh_shared.outbox.wiring import election_name

from ordermesh_deploy.audit import audit, render, stack_databases
from ordermesh_deploy.load import run_load, settle
from ordermesh_deploy.local import Stack, ctl


def say(message: str) -> None:
    """Print one timestamped action line."""
    stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    print(f"[{stamp}] {message}", flush=True)


class Target:
    """Something chaos can act on: the local stack's processes or compose's containers."""

    async def kill(self, name: str) -> None:
        """Crash it (no goodbye)."""
        raise NotImplementedError

    async def pause(self, name: str) -> None:
        """Freeze it (it keeps its sockets and leases, and answers nothing)."""
        raise NotImplementedError

    async def resume(self, name: str) -> None:
        """Unfreeze it."""
        raise NotImplementedError

    async def restart(self, name: str) -> None:
        """Stop and start it."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """What can be targeted."""
        raise NotImplementedError


SERVER_OUTAGE = 3.0  # seconds the machine's Postgres or RabbitMQ stays down on kill/restart


async def _run(*command: str) -> None:
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} failed")


async def bounce_server(name: str, *, hard: bool) -> None:
    """Take the machine's Postgres or RabbitMQ down for a moment and bring it back.

    The local stack uses the machine's servers, so this is felt by everything using them.
    ``hard`` stops Postgres in immediate mode (no checkpoint, like a crash).
    """
    if name == "postgres":
        cluster = ["15", "main"]
        mode = ["-m", "immediate"] if hard else []
        await _run("pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "stop", *mode)
        await asyncio.sleep(SERVER_OUTAGE)
        await _run("pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "start")
    else:
        await _run("rabbitmqctl", "-q", "stop_app")
        await asyncio.sleep(SERVER_OUTAGE)
        await _run("rabbitmqctl", "-q", "start_app")
    say(f"{name} is back")


class LocalTarget(Target):
    """The local stack: supervisord restarts a killed process by itself; ``postgres`` and
    ``rabbitmq`` are the machine's servers (down for a few seconds, then started again)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    async def _ctl(self, *args: str) -> None:
        result = await asyncio.to_thread(ctl, self.stack, *args, check=False)
        out = (result.stdout + result.stderr).strip()
        if "ERROR" in out or result.returncode not in (0, 3):
            raise RuntimeError(f"supervisorctl {' '.join(args)}: {out}")

    async def kill(self, name: str) -> None:
        if name in ("postgres", "rabbitmq"):
            await bounce_server(name, hard=True)
            return
        await self._ctl("signal", "KILL", await self.resolve(name))

    async def pause(self, name: str) -> None:
        await self._ctl("signal", "STOP", await self.resolve(name))

    async def resume(self, name: str) -> None:
        await self._ctl("signal", "CONT", await self.resolve(name))

    async def restart(self, name: str) -> None:
        if name in ("postgres", "rabbitmq"):
            await bounce_server(name, hard=False)
            return
        await self._ctl("restart", await self.resolve(name))

    async def resolve(self, name: str) -> str:
        """A program name; ``relay-leader:<service>`` is whoever relays that service's outbox."""
        if not name.startswith("relay-leader:"):
            return name
        service = name.partition(":")[2]
        async with EtcdClient(self.stack.etcd_url) as etcd:
            leader = await etcd.leader(election_name(service))
        if leader is None:
            raise RuntimeError(f"nobody relays {service}'s outbox right now")
        # The leader's value is its instance id, "<service>-<host>-<port>".
        port = leader.value.decode().rsplit("-", 1)[-1]
        for program, url in self.stack.instances.items():
            if url.endswith(f":{port}"):
                say(f"{name} is {program}")
                return program
        raise RuntimeError(f"{name}: no program listens on port {port}")

    def names(self) -> list[str]:
        extra = ["etcd"] if self.stack.private_etcd else []
        return [*self.stack.instances, *extra]


class ComposeTarget(Target):
    """The docker compose stack (names are compose services, e.g. payment, postgres)."""

    async def _compose(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec("docker", "compose", *args)
        if await proc.wait() != 0:
            raise RuntimeError(f"docker compose {' '.join(args)} failed")

    async def kill(self, name: str) -> None:
        await self._compose("kill", "-s", "SIGKILL", name)
        # compose does not restart a killed container under `unless-stopped` until asked.
        await self._compose("start", name)

    async def pause(self, name: str) -> None:
        await self._compose("pause", name)

    async def resume(self, name: str) -> None:
        await self._compose("unpause", name)

    async def restart(self, name: str) -> None:
        await self._compose("restart", name)

    def names(self) -> list[str]:
        out = subprocess.run(
            ["docker", "compose", "config", "--services"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.split()


async def act(target: Target, action: str, name: str, *, hold: float = 0.0) -> None:
    """Do one action and print it; ``pause`` with ``hold`` resumes after that many seconds."""
    say(f"{action} {name}")
    if action == "kill":
        await target.kill(name)
    elif action == "restart":
        await target.restart(name)
    elif action == "pause":
        await target.pause(name)
        if hold > 0:
            await asyncio.sleep(hold)
            say(f"resume {name}")
            await target.resume(name)
    elif action == "resume":
        await target.resume(name)
    else:
        raise ValueError(f"unknown action {action!r}")


async def set_fault(base_url: str, token: str, spec: dict[str, float | int | None]) -> None:
    """Set (or, with an empty spec, clear) an instance's injected faults."""
    async with httpx.AsyncClient(timeout=5) as client:
        headers = {"X-Admin-Token": token}
        if any(v for v in spec.values()):
            response = await client.put(f"{base_url}/admin/faults", json=spec, headers=headers)
        else:
            response = await client.delete(f"{base_url}/admin/faults", headers=headers)
        response.raise_for_status()
    say(f"faults on {base_url}: {spec or 'cleared'}")


async def random_faults(target: Target, *, every: float, duration: float, seed: int) -> None:
    """A seeded fault every ``every`` s for ``duration`` s: kills and short pauses."""
    rng = random.Random(seed)
    names = [n for n in target.names() if n != "etcd"]
    ends = time.monotonic() + duration
    while time.monotonic() + every <= ends:
        await asyncio.sleep(every)
        name = rng.choice(names)
        if rng.random() < 0.6:
            await act(target, "kill", name)
        else:
            await act(target, "pause", name, hold=rng.uniform(0.5, every * 0.6))


@dataclass(frozen=True)
class Scenario:
    """Load for ``duration`` s while ``fault`` runs, then settle and audit."""

    name: str
    what: str
    fault: Callable[[Target], Awaitable[None]]
    duration: float = 8.0
    rate: float = 15.0


def _after(
    delay: float, action: str, name: str, hold: float = 0.0
) -> Callable[[Target], Awaitable[None]]:
    async def fault(target: Target) -> None:
        await asyncio.sleep(delay)
        await act(target, action, name, hold=hold)

    return fault


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("kill-payment", "SIGKILL payment under load", _after(2.0, "kill", "payment-1")),
        Scenario(
            "kill-order", "SIGKILL the order service mid-saga", _after(2.0, "kill", "order-1")
        ),
        Scenario(
            "pause-inventory",
            "SIGSTOP inventory longer than the client's attempt timeout, then SIGCONT",
            _after(2.0, "pause", "inventory-1", hold=4.0),
        ),
        Scenario("kill-etcd", "SIGKILL the registry (private etcd)", _after(2.0, "kill", "etcd")),
        Scenario(
            "kill-relay-leader",
            "SIGKILL the instance relaying inventory's outbox (scaled: another one takes over)",
            _after(2.0, "kill", "relay-leader:inventory"),
        ),
        Scenario(
            "restart-rabbitmq",
            "stop the machine's RabbitMQ for 3 s while events flow, then start it",
            _after(2.0, "restart", "rabbitmq"),
        ),
        Scenario(
            "kill-postgres",
            "stop the machine's PostgreSQL in immediate mode (a crash) for 3 s, then start it",
            _after(2.0, "kill", "postgres"),
        ),
        Scenario(
            "random",
            "seeded random kills and pauses every 5 s for two minutes",
            lambda t: random_faults(t, every=5.0, duration=120.0, seed=1),
            duration=120.0,
        ),
    )
}


async def run_scenario(stack: Stack, scenario: Scenario, *, seed: int = 1) -> bool:
    """Load + fault + heal + audit; prints the audit table; True if every invariant holds."""
    target = LocalTarget(stack)
    url = stack.instances["order-1"]
    say(f"scenario {scenario.name}: {scenario.what}")
    say(f"load: {scenario.rate:g} orders/s for {scenario.duration:g} s (seed {seed})")
    started = time.monotonic()
    load, _ = await asyncio.gather(
        run_load(url, rate=scenario.rate, duration=scenario.duration, seed=seed),
        scenario.fault(target),
    )
    say(f"load done: {load.summary().splitlines()[0]}; waiting for the platform to settle")
    final = await settle(url, load.order_ids, within=60)
    say("final statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(final.items())))
    findings = await audit(stack_databases(stack), within=30)
    print(render(findings))
    ok = all(f.ok for f in findings)
    verdict = "PASSED" if ok else "FAILED"
    say(f"scenario {scenario.name}: {verdict} in {time.monotonic() - started:.1f} s")
    return ok


def _target(args: argparse.Namespace) -> Target:
    if args.target == "compose":
        return ComposeTarget()
    stack = Stack.load(Path(args.run_dir))
    if stack is None:
        raise SystemExit(f"no local stack in {args.run_dir}: start one with `make dev`")
    return LocalTarget(stack)


def _cmd_action(args: argparse.Namespace) -> int:
    asyncio.run(act(_target(args), args.command, args.name, hold=getattr(args, "hold", 0.0)))
    return 0


def _cmd_fault(args: argparse.Namespace) -> int:
    stack = Stack.load(Path(args.run_dir))
    if stack is None or args.name not in stack.instances:
        raise SystemExit(f"{args.name}: not an instance of the local stack in {args.run_dir}")
    spec: dict[str, float | int | None] = {}
    if not args.clear:
        spec = {
            "error_rate": args.error_rate,
            "latency_ms": args.latency_ms,
            "hang": args.hang,
            "status": args.status,
        }
    asyncio.run(set_fault(stack.instances[args.name], args.token, spec))
    return 0


def _cmd_random(args: argparse.Namespace) -> int:
    asyncio.run(
        random_faults(_target(args), every=args.every, duration=args.duration, seed=args.seed)
    )
    return 0


def _cmd_scenario(args: argparse.Namespace) -> int:
    stack = Stack.load(Path(args.run_dir))
    if stack is None:
        raise SystemExit(f"no local stack in {args.run_dir}: start one with `make dev`")
    names = list(SCENARIOS) if args.name == "all" else [args.name]
    results = {n: asyncio.run(run_scenario(stack, SCENARIOS[n], seed=args.seed)) for n in names}
    for name, ok in results.items():
        print(f"{name:<18} {'passed' if ok else 'FAILED'}")
    return 0 if all(results.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``ordermesh-chaos`` command line."""
    parser = argparse.ArgumentParser(
        prog="ordermesh-chaos",
        description="Kill, pause and restart parts of Ordermesh; run scenarios with an audit.",
    )
    parser.add_argument("--target", choices=["local", "compose"], default="local")
    parser.add_argument("--run-dir", default=".run", help="the local stack's run dir")
    sub = parser.add_subparsers(dest="command", required=True)
    for action, text in (
        ("kill", "SIGKILL a process / container (the supervisor restarts it)"),
        ("pause", "SIGSTOP a process / pause a container"),
        ("resume", "SIGCONT a process / unpause a container"),
        ("restart", "restart a process / container"),
    ):
        cmd = sub.add_parser(action, help=text)
        cmd.add_argument(
            "name",
            help="e.g. payment-1, order-1, etcd, relay-leader:payment (compose: payment, postgres)",
        )
        if action == "pause":
            cmd.add_argument(
                "--for",
                dest="hold",
                type=float,
                default=0.0,
                help="resume after this many seconds (default: stay paused)",
            )
        cmd.set_defaults(func=_cmd_action)
    fault = sub.add_parser("fault", help="inject errors/latency into an instance (local stack)")
    fault.add_argument("name", help="e.g. payment-1")
    fault.add_argument("--error-rate", type=float, default=0.0, help="0..1 of requests fail")
    fault.add_argument("--latency-ms", type=int, default=0, help="added to every request")
    fault.add_argument("--hang", action="store_true", help="never answer")
    fault.add_argument("--status", type=int, default=None, help="answer this status instead")
    fault.add_argument("--clear", action="store_true", help="remove every fault")
    fault.add_argument("--token", default="ordermesh-admin", help="ADMIN_TOKEN of the stack")
    fault.set_defaults(func=_cmd_fault)
    rnd = sub.add_parser("random", help="seeded random kills and pauses")
    rnd.add_argument("--every", type=float, default=5.0, help="seconds between faults")
    rnd.add_argument("--for", dest="duration", type=float, default=60.0, help="seconds in all")
    rnd.add_argument("--seed", type=int, default=1)
    rnd.set_defaults(func=_cmd_random)
    scen = sub.add_parser("scenario", help="load + fault + heal + audit (local stack)")
    scen.add_argument(
        "name",
        choices=[*SCENARIOS, "all"],
        help="; ".join(f"{s.name}: {s.what}" for s in SCENARIOS.values()),
    )
    scen.add_argument("--seed", type=int, default=1)
    scen.set_defaults(func=_cmd_scenario)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ordermesh-chaos``."""
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
