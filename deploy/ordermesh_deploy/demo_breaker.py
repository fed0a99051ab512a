"""``make demo-breaker``: watch a circuit breaker open on a flaky payment instance, and close.

Self-contained by default: it starts its own payment-like instance(s) on loopback (the same
fault injection and deadline middleware as the real services) and calls them through
ServiceClient. With ``--stack`` it uses the running local stack instead (``make dev``):
payment instances are found in etcd (URL from ``.run/stack.json``) and the faults are
injected through their ``/admin/faults`` with the admin token.

The story, printed call by call: healthy calls; every request of one instance answers 503
(injected); the breaker opens after ``--failures`` failures and later calls fail at once,
sending nothing; the fault is cleared; after ``--reset`` seconds one trial call goes through
and closes the breaker. Exit status 0 when the breaker was seen to open and close again.

    uv run python -m ordermesh_deploy.demo_breaker              # self-contained
    uv run python -m ordermesh_deploy.demo_breaker --instances 2  # calls route around it
    uv run python -m ordermesh_deploy.demo_breaker --stack        # against `make dev`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog
import uvicorn
from fastapi import FastAPI
from ordermesh_shared.admin import ADMIN_TOKEN_HEADER
from ordermesh_shared.discovery import ServiceInstance
from ordermesh_shared.faults import (
    FaultInjectionMiddleware,
    Faults,
    fault_router,
)
from ordermesh_shared.resilience import (
    CircuitOpen,
    ClientPolicy,
    DeadlineMiddleware,
    InstanceSource,
    ServiceClient,
    StaticInstances,
    UpstreamError,
    UpstreamUnavailable,
)
from pydantic import SecretStr

SERVICE = "payment"


@dataclass
class Timeline:
    """Breaker state changes as they happen, printed beside the call that caused them."""

    changes: list[tuple[str, str, str]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def record(self, _target: str, instance: str, old: str, new: str) -> None:
        self.changes.append((instance, old, new))
        self.pending.append(f"{instance}: {old} -> {new}")

    def take(self) -> str:
        text, self.pending = "; ".join(self.pending), []
        return text

    def saw(self, instance: str, new: str) -> bool:
        return any(i == instance and n == new for i, _, n in self.changes)


class Demo:
    """Drives the calls and the faults; prints what a caller sees."""

    def __init__(
        self, clients: ServiceClient, timeline: Timeline, *, token: str, path: str
    ) -> None:
        self.clients = clients
        self.timeline = timeline
        self.token = token
        self.path = path
        self.number = 0

    async def calls(self, count: int, *, pause: float = 0.15) -> None:
        for _ in range(count):
            await self.call()
            await asyncio.sleep(pause)

    async def call(self) -> None:
        self.number += 1
        started = time.perf_counter()
        try:
            answer = await self.clients.service(SERVICE).get(self.path)
            outcome, status = "ok", str(answer.status)
        except CircuitOpen:
            outcome, status = "circuit open", "-  (failed fast, nothing sent)"
        except UpstreamUnavailable as exc:
            outcome, status = "unavailable", str(exc.status or "-")
        except UpstreamError as exc:
            outcome, status = type(exc).__name__, str(exc)
        took = (time.perf_counter() - started) * 1000
        changes = self.timeline.take()
        note = f"   breaker {changes}" if changes else ""
        print(f"   call {self.number:>2}  {outcome:<13} {took:7.1f} ms  {status}{note}")

    async def set_faults(self, instance: ServiceInstance, spec: dict[str, object] | None) -> None:
        url = f"{instance.base_url}/admin/faults"
        headers = {ADMIN_TOKEN_HEADER: self.token}
        async with httpx.AsyncClient(timeout=5) as http:
            if spec is None:
                answer = await http.delete(url, headers=headers)
            else:
                answer = await http.put(url, json=spec, headers=headers)
        if answer.status_code != 200:
            raise SystemExit(f"{url} answered {answer.status_code}: {answer.text}")


async def run(args: argparse.Namespace) -> int:
    timeline = Timeline()
    policy = ClientPolicy(
        max_attempts=args.attempts,
        breaker_failures=args.failures,
        breaker_reset=args.reset,
        attempt_timeout=2.0,
        timeout=5.0,
    )
    async with contextlib.AsyncExitStack() as stack:
        source, instances = await stack.enter_async_context(_instances(args))
        clients = await stack.enter_async_context(
            ServiceClient(source, policy=policy, on_breaker_change=timeline.record)
        )
        demo = Demo(clients, timeline, token=args.admin_token, path=args.path)
        victim = _victim(instances, args.instance)
        _introduce(instances, victim, args)
        return await _story(demo, victim, args)


async def _story(demo: Demo, victim: ServiceInstance, args: argparse.Namespace) -> int:
    print("\n1. all healthy")
    await demo.calls(4)
    print(f"\n2. inject a fault on {victim.instance_id}: every request answers 503")
    await demo.set_faults(victim, {"status": 503})
    try:
        await demo.calls(args.failures + 5)
    finally:
        print(f"\n3. clear the fault on {victim.instance_id}")
        await demo.set_faults(victim, None)
    await demo.calls(2)
    print(f"   waiting {args.reset:.1f} s for the breaker's reset timeout...")
    await asyncio.sleep(args.reset)
    print("\n4. after the reset timeout: one trial call, then business as usual")
    await demo.calls(4)
    return _verdict(demo.timeline, victim)


def _verdict(timeline: Timeline, victim: ServiceInstance) -> int:
    opened = timeline.saw(victim.instance_id, "open")
    closed = timeline.saw(victim.instance_id, "closed")
    if opened and closed:
        print(f"\nthe breaker of {victim.instance_id} opened under the fault and closed again.")
        return 0
    print(f"\nunexpected: breaker of {victim.instance_id} opened={opened} closed={closed}")
    return 1


def _introduce(
    instances: Sequence[ServiceInstance], victim: ServiceInstance, args: argparse.Namespace
) -> None:
    where = ", ".join(f"{i.instance_id} at {i.base_url}" for i in instances)
    print(f"ordermesh demo-breaker: {SERVICE}: {where}")
    print(
        f"breaker: opens after {args.failures} consecutive failures of an instance, admits one "
        f"trial call {args.reset:.1f} s later; {args.attempts} attempt(s) per call; "
        f"faults go to {victim.instance_id}"
    )


def _victim(instances: Sequence[ServiceInstance], wanted: str | None) -> ServiceInstance:
    for instance in instances:
        if wanted is None or instance.instance_id == wanted:
            return instance
    known = ", ".join(i.instance_id for i in instances)
    raise SystemExit(f"no {SERVICE} instance {wanted!r} (known: {known})")


@contextlib.asynccontextmanager
async def _instances(
    args: argparse.Namespace,
) -> AsyncIterator[tuple[InstanceSource, Sequence[ServiceInstance]]]:
    if args.stack:
        async with _stack_instances(args.run_dir) as found:
            yield found
    else:
        async with _own_instances(args.instances, args.admin_token) as found:
            yield found


@contextlib.asynccontextmanager
async def _stack_instances(
    run_dir: Path,
) -> AsyncIterator[tuple[InstanceSource, Sequence[ServiceInstance]]]:
    from ordermesh_shared.discovery.etcd import EtcdRegistry

    stack_file = run_dir / "stack.json"
    if not stack_file.exists():
        raise SystemExit(f"{stack_file} not found: start the local stack first (make dev)")
    etcd_url = json.loads(stack_file.read_text())["etcd_url"]
    async with EtcdRegistry(etcd_url) as registry:
        await registry.watch(SERVICE)
        instances = registry.instances(SERVICE)
        if not instances:
            raise SystemExit(f"no {SERVICE} instance registered in etcd at {etcd_url}")
        yield registry, instances


@contextlib.asynccontextmanager
async def _own_instances(
    count: int, token: str
) -> AsyncIterator[tuple[InstanceSource, Sequence[ServiceInstance]]]:
    servers = [_server(payment_like_app(token)) for _ in range(count)]
    tasks = [asyncio.create_task(s.serve(), name="demo-payment") for s in servers]
    try:
        pairs = enumerate(zip(servers, tasks, strict=True), start=1)
        instances = [await _started(server, task, n) for n, (server, task) in pairs]
        yield StaticInstances({SERVICE: instances}), instances
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


def payment_like_app(token: str) -> FastAPI:
    """A stand-in payment instance: one read route, with the services' middleware."""
    app = FastAPI(title="demo payment")
    faults = Faults()
    app.add_middleware(FaultInjectionMiddleware, faults=faults)
    app.add_middleware(DeadlineMiddleware)
    app.include_router(fault_router(faults, admin_token=SecretStr(token)))

    @app.get("/customers")
    async def customers() -> list[dict[str, str]]:
        return [{"id": "alice", "name": "Alice Martin", "balance": "100000.00"}]

    return app


class _InProcessServer(uvicorn.Server):
    """uvicorn inside the demo's loop; Ctrl-C stays the demo's, not the server's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: FastAPI) -> uvicorn.Server:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    return _InProcessServer(config)


async def _started(server: uvicorn.Server, task: asyncio.Task[None], n: int) -> ServiceInstance:
    while not server.started:
        if task.done():
            await task
            raise SystemExit("the demo payment instance did not start")
        await asyncio.sleep(0.01)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    return ServiceInstance(SERVICE, f"{SERVICE}-{n}", "127.0.0.1", port)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo-breaker",
        description="Show a circuit breaker opening on a flaky payment instance and closing "
        "again after the fault is cleared.",
    )
    parser.add_argument(
        "--stack", action="store_true", help="use the running local stack (make dev)"
    )
    parser.add_argument("--run-dir", type=Path, default=Path(".run"), help="the stack's run dir")
    parser.add_argument(
        "--instances", type=int, default=1, help="self-contained: instances to start"
    )
    parser.add_argument("--instance", help="instance id to make flaky (default: the first)")
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("ADMIN_TOKEN"),
        help="X-Admin-Token for /admin/faults (default: $ADMIN_TOKEN, else the stack's own"
        " with --stack, else a random one for the demo's own instances)",
    )
    parser.add_argument("--path", default="/customers", help="the read route to call")
    parser.add_argument("--failures", type=int, default=3, help="failures that open a breaker")
    parser.add_argument("--reset", type=float, default=2.0, help="seconds before a trial call")
    parser.add_argument("--attempts", type=int, default=1, help="attempts per call (retries+1)")
    parser.add_argument(
        "--verbose", action="store_true", help="also print the client's own log lines"
    )
    args = parser.parse_args(argv)
    if args.instances < 1 or args.failures < 1 or args.attempts < 1 or args.reset <= 0:
        parser.error("--instances, --failures, --attempts must be >= 1 and --reset > 0")
    if not args.admin_token:
        args.admin_token = _stack_admin_token(args.run_dir) if args.stack else _demo_token()
    return args


def _stack_admin_token(run_dir: Path) -> str:
    from ordermesh_deploy import local, stacks

    stack = local.Stack.load(run_dir)
    if stack is None:
        raise SystemExit(f"{run_dir / 'stack.json'} not found: start the local stack first")
    return stacks.or_exit(lambda: stacks.LocalEndpoints(stack).admin_token)


def _demo_token() -> str:
    # The demo's own instances need some token, never a well-known one.
    return secrets.token_urlsafe(16)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.verbose:  # the timeline already shows the breaker's changes
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        sys.exit(asyncio.run(run(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
