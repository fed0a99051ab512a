"""Chaos on purpose: kill, pause, partition and restart parts of the platform, then check the books.

Acts on whichever stack runs (``--target`` chooses): the local stack's processes under
supervisord (SIGKILL, SIGSTOP/SIGCONT, restart) or the compose stack's containers (kill and
start, pause/unpause, restart). A service's name picks one of its instances at random
(seeded, printed), ``payment-2`` names one, ``--all`` takes every one. ``partition A B`` cuts
the network between two components on either stack (``partition`` module), until ``heal``
or for ``--for`` seconds. Every action is printed with a timestamp. Scenarios run load +
fault + heal + audit.

    ordermesh-chaos kill payment-1                  # the local stack (make dev)
    ordermesh-chaos pause inventory-1 --for 6       # SIGSTOP, then SIGCONT after 6 s
    ordermesh-chaos --target compose kill payment   # one payment replica, picked at random
    ordermesh-chaos partition order inventory --for 10   # as root; healed after 10 s
    ordermesh-chaos partition etcd all              # etcd from everyone, until:
    ordermesh-chaos heal                            # every cut (or: heal etcd)
    ordermesh-chaos fault payment-2 --error-rate 0.5 --latency-ms 200
    ordermesh-chaos random --every 4 --for 40 --seed 7
    ordermesh-chaos scenario kill-payment           # or: scenario all
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from ordermesh_deploy import local, partition, stacks
from ordermesh_deploy.audit import audit, render
from ordermesh_deploy.load import run_load, settle
from ordermesh_deploy.partition_compose import ComposeCutter
from ordermesh_deploy.partition_local import LocalCutter
from ordermesh_deploy.targets import ComposeTarget, LocalTarget, Target, say, split_name

ACTIONS = ("kill", "pause", "resume", "restart")


async def act(
    target: Target,
    action: str,
    name: str,
    *,
    hold: float = 0.0,
    everyone: bool = False,
    seed: int = 1,
) -> list[str]:
    """Do one action on what ``name`` means and print it; returns the instances acted on.

    A service's name means one of its instances, picked with ``seed`` (every one with
    ``everyone``). ``pause`` with ``hold`` resumes after that many seconds.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    chosen = await target.resolve(name, everyone=everyone, rng=random.Random(seed))
    _say_chosen(name, chosen, everyone=everyone, seed=seed)
    await asyncio.gather(*(_act_on(target, action, one, hold=hold) for one in chosen))
    return chosen


def _say_chosen(name: str, chosen: list[str], *, everyone: bool, seed: int) -> None:
    if chosen == [name]:
        return
    # A service's name was a choice (relay-leader:<service> is not): say how to repeat it.
    picked = " (all)" if everyone else f" (picked with --seed {seed})"
    say(f"{name} is {', '.join(chosen)}" + picked * (":" not in name))


async def _act_on(target: Target, action: str, name: str, *, hold: float) -> None:
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
    else:
        await target.resume(name)


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
    """A seeded fault every ``every`` s for ``duration`` s: kills and short pauses of the
    services' instances (never the infrastructure)."""
    rng = random.Random(seed)
    names = [n for n in target.names() if split_name(n)[0] in stacks.APP_SERVICES]
    ends = time.monotonic() + duration
    while time.monotonic() + every <= ends:
        await asyncio.sleep(every)
        name = rng.choice(names)
        if rng.random() < 0.6:
            await act(target, "kill", name)
        else:
            await act(target, "pause", name, hold=rng.uniform(0.5, every * 0.6))


def cutter_for(target: Target, *, run_dir: Path = Path(".run")) -> partition.Cutter:
    """What cuts the network of the stack ``target`` acts on (compose keeps its cuts'
    record in ``run_dir``; the local stack in its own run dir)."""
    if isinstance(target, LocalTarget):
        return LocalCutter(target.stack)
    assert isinstance(target, ComposeTarget)
    return ComposeCutter(target.project, state_dir=run_dir)


async def cut_for(cutter: partition.Cutter, a: str, b: str, *, hold: float) -> None:
    """Cut ``a`` from ``b`` for ``hold`` s (taking in restarted members), then heal it."""
    partition.require_privileges()
    cut = await asyncio.to_thread(partition.create, cutter, a, b, hold=hold)
    say(f"partition {cut.describe()}")
    await partition.keep(cutter, cut)
    say(f"healed {a} <-> {b}")


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


def _cut_after(delay: float, a: str, b: str, hold: float) -> Callable[[Target], Awaitable[None]]:
    async def fault(target: Target) -> None:
        await asyncio.sleep(delay)
        await cut_for(cutter_for(target), a, b, hold=hold)

    return fault


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "kill-payment",
            "kill payment-1 under load (started again, as its supervisor would)",
            _after(2.0, "kill", "payment-1"),
        ),
        Scenario("kill-order", "kill the order service mid-saga", _after(2.0, "kill", "order-1")),
        Scenario(
            "pause-inventory",
            "pause inventory longer than the client's attempt timeout, then resume it",
            _after(2.0, "pause", "inventory-1", hold=4.0),
        ),
        Scenario(
            "kill-etcd",
            "kill the registry's etcd (local: the private one; compose: its container)",
            _after(2.0, "kill", "etcd"),
        ),
        Scenario(
            "kill-relay-leader",
            "kill the instance relaying inventory's outbox (scaled: another one takes over)",
            _after(2.0, "kill", "relay-leader:inventory"),
        ),
        Scenario(
            "restart-rabbitmq",
            "restart RabbitMQ while events flow (local: the machine's, down 3 s;"
            " compose: its container)",
            _after(2.0, "restart", "rabbitmq"),
        ),
        Scenario(
            "kill-postgres",
            "crash PostgreSQL (local: the machine's, stopped in immediate mode for 3 s;"
            " compose: its container killed and started)",
            _after(2.0, "kill", "postgres"),
        ),
        Scenario(
            "partition-payment-postgres",
            "cut payment from its database for 5 s (its queries wait; charges time out)",
            _cut_after(2.0, "payment", "postgres", hold=5.0),
            duration=10.0,
        ),
        Scenario(
            "partition-inventory-rabbitmq",
            "cut inventory from the broker for 5 s (its outbox holds the events, then relays)",
            _cut_after(2.0, "inventory", "rabbitmq", hold=5.0),
            duration=10.0,
        ),
        Scenario(
            "partition-order-inventory",
            "cut order from inventory for 5 s (reservations refused or delayed, not guessed)",
            _cut_after(2.0, "order", "inventory", hold=5.0),
            duration=10.0,
        ),
        Scenario(
            "partition-etcd",
            "cut etcd from everyone for 5 s (registry, relay elections and saga leases)",
            _cut_after(2.0, "etcd", partition.ALL, hold=5.0),
            duration=10.0,
        ),
        Scenario(
            "random",
            "seeded random kills and pauses every 5 s for two minutes",
            lambda t: random_faults(t, every=5.0, duration=120.0, seed=1),
            duration=120.0,
        ),
    )
}


async def run_scenario(
    target: Target, stack: stacks.Endpoints, scenario: Scenario, *, seed: int = 1
) -> bool:
    """Load + fault + heal + audit; prints the audit table; True if every invariant holds."""
    url = stack.order_url
    say(f"scenario {scenario.name} on the {stack.kind} stack: {scenario.what}")
    say(f"load: {scenario.rate:g} orders/s for {scenario.duration:g} s (seed {seed})")
    started = time.monotonic()
    load, _ = await asyncio.gather(
        run_load(url, rate=scenario.rate, duration=scenario.duration, seed=seed),
        scenario.fault(target),
    )
    sent, _, errors = load.summary().splitlines()  # orders and refusals; latency is not news
    say(f"load done: {sent}; {errors}; waiting for the platform to settle")
    final = await settle(url, load.order_ids, within=60)
    say("final statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(final.items())))
    # Found again: a container killed or restarted by the fault publishes new host ports.
    stack = await asyncio.to_thread(stack.refresh)
    findings = await audit(stack.databases, within=30)
    print(render(findings))
    ok = all(f.ok for f in findings)
    verdict = "PASSED" if ok else "FAILED"
    say(f"scenario {scenario.name}: {verdict} in {time.monotonic() - started:.1f} s")
    return ok


def target_for(stack: stacks.Endpoints) -> Target:
    """What chaos acts on in a found stack."""
    if isinstance(stack, stacks.LocalEndpoints):
        return LocalTarget(stack.stack)
    assert isinstance(stack, stacks.ComposeEndpoints)
    return ComposeTarget(stack.project)


def _found(args: argparse.Namespace) -> tuple[Target, stacks.Endpoints]:
    stack = stacks.find_or_exit(args.target, run_dir=args.run_dir)
    return target_for(stack), stack


def _seed(args: argparse.Namespace) -> int:
    # A fresh seed unless one is given: printed with the pick, so a run can be repeated.
    return args.seed if args.seed is not None else random.randrange(1_000_000)


def _cmd_action(args: argparse.Namespace) -> int:
    target, _ = _found(args)
    run = act(target, args.command, args.name, hold=args.hold, everyone=args.all, seed=_seed(args))
    try:
        asyncio.run(run)
    except (LookupError, RuntimeError) as exc:
        raise SystemExit(str(exc)) from None
    return 0


def _cmd_fault(args: argparse.Namespace) -> int:
    target, stack = _found(args)
    seed = _seed(args)
    try:
        chosen = asyncio.run(target.resolve(args.name, everyone=args.all, rng=random.Random(seed)))
    except (LookupError, RuntimeError) as exc:
        raise SystemExit(str(exc)) from None
    _say_chosen(args.name, chosen, everyone=args.all, seed=seed)
    urls = stacks.or_exit(lambda: stack.instances)
    missing = [name for name in chosen if name not in urls]
    if missing:
        raise SystemExit(f"{', '.join(missing)}: not a running instance of a service here")
    spec: dict[str, float | int | None] = {}
    if not args.clear:
        spec = {
            "error_rate": args.error_rate,
            "latency_ms": args.latency_ms,
            "hang": args.hang,
            "status": args.status,
        }
    token = args.token or stacks.or_exit(lambda: stack.admin_token)
    for name in chosen:
        say(f"fault {name} ({urls[name]})")
        try:
            asyncio.run(set_fault(urls[name], token, spec))
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            refused = " (the admin token was refused)" * (status in (401, 403))
            raise SystemExit(f"{name}: /admin/faults answered {status}{refused}") from None
        except httpx.HTTPError as exc:
            raise SystemExit(f"{name}: /admin/faults did not answer: {exc!r}") from None
    return 0


def _cutter(args: argparse.Namespace, *, running: bool = True) -> partition.Cutter:
    """The stack's cutter; ``running=False`` also finds a stopped local stack (to heal)."""
    try:
        stack = stacks.find(args.target, run_dir=args.run_dir)
    except stacks.StackError as exc:
        saved = local.Stack.load(args.run_dir) if not running and args.target != "compose" else None
        if saved is None:
            raise SystemExit(str(exc)) from None
        return LocalCutter(saved)
    return cutter_for(target_for(stack), run_dir=args.run_dir)


def _cmd_partition(args: argparse.Namespace) -> int:
    cutter = _cutter(args)
    try:
        partition.require_privileges()
        if args.hold:
            asyncio.run(cut_for(cutter, args.a, args.b, hold=args.hold))
        else:
            cut = partition.create(cutter, args.a, args.b, hold=None)
            say(f"partition {cut.describe()}")
    except partition.PartitionError as exc:
        raise SystemExit(str(exc)) from None
    return 0


def _cmd_heal(args: argparse.Namespace) -> int:
    cutter = _cutter(args, running=False)
    try:
        partition.require_privileges()
        healed = partition.heal(cutter, args.a, args.b)
    except partition.PartitionError as exc:
        raise SystemExit(str(exc)) from None
    for cut in healed:
        say(f"healed {cut.a} <-> {cut.b}")
    if not healed:
        say("no partition to heal" + (f" involving {args.a}" if args.a else ""))
    return 0


def _cmd_partitions(args: argparse.Namespace) -> int:
    cutter = _cutter(args, running=False)
    cuts = partition.load(cutter.state_file)
    print("\n".join(cut.describe() for cut in cuts) or f"no partition on the {cutter.kind} stack")
    return 0


def _add_partition_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cut = sub.add_parser(
        "partition",
        help="cut the network between A and B (as root); kept until `heal` unless --for",
        description="Cut the network between two components: local stack, a cgroup per"
        " service instance and iptables on loopback; compose, iptables in each side's"
        " container namespace. Only A<->B is cut. Running it again for the same pair takes"
        " in a member restarted since.",
    )
    cut.add_argument("a", metavar="A", help=COMPONENT_HELP)
    cut.add_argument(
        "b",
        metavar="B",
        nargs="?",
        default=partition.ALL,
        help=f"the other side, or `{partition.ALL}` (the default): every other component",
    )
    cut.add_argument(
        "--for",
        dest="hold",
        metavar="SECONDS",
        type=float,
        default=None,
        help="heal by itself after this many seconds (the command waits; default: the cut"
        " stays until `ordermesh-chaos heal`)",
    )
    cut.set_defaults(func=_cmd_partition)
    heal = sub.add_parser("heal", help="heal the cut between A and B, every cut of A, or all")
    heal.add_argument("a", metavar="A", nargs="?", default=None, help="heal only A's cuts")
    heal.add_argument("b", metavar="B", nargs="?", default=None, help="only A<->B")
    heal.set_defaults(func=_cmd_heal)
    listing = sub.add_parser("partitions", help="the cuts in place, and when each heals")
    listing.set_defaults(func=_cmd_partitions)


def _cmd_random(args: argparse.Namespace) -> int:
    target, _ = _found(args)
    asyncio.run(random_faults(target, every=args.every, duration=args.duration, seed=args.seed))
    return 0


def _cmd_scenario(args: argparse.Namespace) -> int:
    target, stack = _found(args)
    names = list(SCENARIOS) if args.name == "all" else [args.name]
    results = {}
    for name in names:
        stack = stack.refresh()
        results[name] = asyncio.run(run_scenario(target, stack, SCENARIOS[name], seed=args.seed))
    for name, ok in results.items():
        print(f"{name:<18} {'passed' if ok else 'FAILED'}")
    return 0 if all(results.values()) else 1


NAME_HELP = (
    "an instance (payment-2: the local program, or compose's replica --index 2), a service"
    " (payment: one of its instances at random), etcd, postgres, rabbitmq (compose: also"
    " consul), or relay-leader:<service> (whoever relays that service's outbox now)"
)


COMPONENT_HELP = (
    "a service (order, inventory, payment, shipping: every instance), an instance (payment-2),"
    " postgres, rabbitmq or etcd (compose: also consul)"
)


def _add_choice_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("name", help=NAME_HELP)
    cmd.add_argument(
        "--all", action="store_true", help="every instance of a service named, not one"
    )
    cmd.add_argument(
        "--seed", type=int, default=None, help="picks the instance of a service (default: fresh)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``ordermesh-chaos`` command line."""
    parser = argparse.ArgumentParser(
        prog="ordermesh-chaos",
        description="Kill, pause, partition and restart parts of Ordermesh; run scenarios"
        " with an audit. Acts on the running stack: the local one (make dev) if it runs, else"
        " compose (make up); --target chooses.",
    )
    stacks.add_target_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for action, text in (
        ("kill", "SIGKILL a process / container; it is started again (supervisor / docker start)"),
        ("pause", "SIGSTOP a process / pause a container"),
        ("resume", "SIGCONT a process / unpause a container"),
        ("restart", "restart a process / container"),
    ):
        cmd = sub.add_parser(action, help=text)
        _add_choice_arguments(cmd)
        if action == "pause":
            cmd.add_argument(
                "--for",
                dest="hold",
                type=float,
                default=0.0,
                help="resume after this many seconds (default: stay paused)",
            )
        else:
            cmd.set_defaults(hold=0.0)
        cmd.set_defaults(func=_cmd_action)
    _add_partition_commands(sub)
    fault = sub.add_parser(
        "fault", help="inject errors/latency into an instance through its /admin/faults"
    )
    _add_choice_arguments(fault)
    fault.add_argument("--error-rate", type=float, default=0.0, help="0..1 of requests fail")
    fault.add_argument("--latency-ms", type=int, default=0, help="added to every request")
    fault.add_argument("--hang", action="store_true", help="never answer")
    fault.add_argument("--status", type=int, default=None, help="answer this status instead")
    fault.add_argument("--clear", action="store_true", help="remove every fault")
    fault.add_argument(
        "--token",
        default=None,
        help="X-Admin-Token (default: the stack's own: compose's ADMIN_TOKEN from its"
        " containers or .env; local: the one `make dev` passed on, else the services' default)",
    )
    fault.set_defaults(func=_cmd_fault)
    rnd = sub.add_parser("random", help="seeded random kills and pauses of service instances")
    rnd.add_argument("--every", type=float, default=5.0, help="seconds between faults")
    rnd.add_argument("--for", dest="duration", type=float, default=60.0, help="seconds in all")
    rnd.add_argument("--seed", type=int, default=1)
    rnd.set_defaults(func=_cmd_random)
    scen = sub.add_parser("scenario", help="load + fault + heal + audit")
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
