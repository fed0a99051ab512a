"""What chaos acts on: the local stack's processes or the compose stack's containers.

A name is an instance (``payment-2``: the local program, or compose's container number 2),
a service (``payment``: one of its instances, picked at random from a seeded generator, or
every one with ``everyone``), an infrastructure part (``etcd``, ``postgres``, ``rabbitmq``,
``consul``) or ``relay-leader:<service>``, whoever relays that service's outbox right now.

>>> target = ComposeTarget("ordermesh")
>>> await target.resolve("payment", everyone=False, rng=random.Random(7))
['payment-2']
>>> await target.kill("payment-2")
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Protocol

from ordermesh_shared.etcd_client import EtcdClient
from ordermesh_shared.outbox.wiring import election_name

from ordermesh_deploy import stacks
from ordermesh_deploy.local import Stack, ctl

SERVER_OUTAGE = 3.0  # seconds the machine's Postgres or RabbitMQ stays down on kill/restart
RELAY_LEADER = "relay-leader:"


def say(message: str) -> None:
    """Print one timestamped action line."""
    stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    print(f"[{stamp}] {message}", flush=True)


def split_name(name: str) -> tuple[str, int | None]:
    """``payment-2`` -> (payment, 2); ``payment`` -> (payment, None)."""
    service, _, number = name.rpartition("-")
    return (service, int(number)) if service and number.isdigit() else (name, None)


def choose_instances(
    name: str, available: list[str], *, everyone: bool, rng: random.Random
) -> list[str]:
    """The instances ``name`` means: itself when it is one, else one of its service's at
    random (every one with ``everyone``); raises LookupError naming what there is."""
    if name in available:
        return [name]
    service, number = split_name(name)
    replicas = sorted((n for n in available if split_name(n)[0] == service), key=split_name)
    if number is None and replicas:
        return replicas if everyone else [rng.choice(replicas)]
    if replicas:
        raise LookupError(f"{name}: no such instance; {service} has {', '.join(replicas)}")
    services = sorted({split_name(n)[0] for n in available})
    raise LookupError(f"{name}: no such service or instance here; try {', '.join(services)}")


class Target(Protocol):
    """Something chaos can act on (names as :func:`Target.resolve` returns them)."""

    def names(self) -> list[str]:
        """Every instance that can be targeted."""
        ...

    async def resolve(self, name: str, *, everyone: bool, rng: random.Random) -> list[str]:
        """The instances a name given by a person means."""
        ...

    async def kill(self, name: str) -> None:
        """Crash it (no goodbye); it is started again, as its supervisor would."""
        ...

    async def pause(self, name: str) -> None:
        """Freeze it (it keeps its sockets and leases, and answers nothing)."""
        ...

    async def resume(self, name: str) -> None:
        """Unfreeze it."""
        ...

    async def restart(self, name: str) -> None:
        """Stop and start it."""
        ...


async def _run(*command: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {err.decode().strip()}")


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


async def relay_leader_address(etcd_url: str, service: str) -> tuple[str, int]:
    """(host, port) of the instance relaying ``service``'s outbox, from its election."""
    async with EtcdClient(etcd_url) as etcd:
        leader = await etcd.leader(election_name(service))
    if leader is None:
        raise RuntimeError(f"nobody relays {service}'s outbox right now")
    # The leader's value is its instance id, "<service>-<host>-<port>".
    host, _, port = leader.value.decode().removeprefix(f"{service}-").rpartition("-")
    return host, int(port)


class LocalTarget:
    """The local stack: supervisord restarts a killed process by itself; ``postgres`` and
    ``rabbitmq`` are the machine's servers (down for a few seconds, then started again)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def names(self) -> list[str]:
        extra = ["etcd"] if self.stack.private_etcd else []
        return [*self.stack.instances, *extra]

    async def resolve(self, name: str, *, everyone: bool, rng: random.Random) -> list[str]:
        if name in ("postgres", "rabbitmq"):
            return [name]
        if name.startswith(RELAY_LEADER):
            service = name.removeprefix(RELAY_LEADER)
            _, port = await relay_leader_address(self.stack.etcd_url, service)
            programs = [p for p, url in self.stack.instances.items() if url.endswith(f":{port}")]
            if not programs:
                raise RuntimeError(f"{name}: no program listens on port {port}")
            return programs
        return choose_instances(name, self.names(), everyone=everyone, rng=rng)

    async def _ctl(self, *args: str) -> None:
        result = await asyncio.to_thread(ctl, self.stack, *args, check=False)
        out = (result.stdout + result.stderr).strip()
        if "ERROR" in out or result.returncode not in (0, 3):
            raise RuntimeError(f"supervisorctl {' '.join(args)}: {out}")

    async def kill(self, name: str) -> None:
        if name in ("postgres", "rabbitmq"):
            await bounce_server(name, hard=True)
            return
        await self._ctl("signal", "KILL", name)

    async def pause(self, name: str) -> None:
        await self._ctl("signal", "STOP", name)

    async def resume(self, name: str) -> None:
        await self._ctl("signal", "CONT", name)

    async def restart(self, name: str) -> None:
        if name in ("postgres", "rabbitmq"):
            await bounce_server(name, hard=False)
            return
        await self._ctl("restart", name)


class ComposeTarget:
    """The compose stack's containers, one replica at a time (``payment-2``), by container id:
    ``docker compose kill payment`` would act on every replica at once."""

    def __init__(self, project: str) -> None:
        self.project = project

    def containers(self) -> dict[str, stacks.Container]:
        """name -> container, as they are now (a kill or a scale changes them)."""
        return {c.name: c for c in stacks.project_containers(self.project)}

    def names(self) -> list[str]:
        return list(self.containers())

    async def resolve(self, name: str, *, everyone: bool, rng: random.Random) -> list[str]:
        containers = await asyncio.to_thread(self.containers)
        if name.startswith(RELAY_LEADER):
            # etcd's host port as it is now: a killed etcd comes back on another one.
            etcd_url = stacks.ComposeEndpoints(list(containers.values())).etcd_url
            host, _ = await relay_leader_address(etcd_url, name.removeprefix(RELAY_LEADER))
            found = [n for n, c in containers.items() if host in c.addresses]
            if not found:
                raise RuntimeError(f"{name}: no container has the address {host}")
            return found
        return choose_instances(name, list(containers), everyone=everyone, rng=rng)

    async def _container(self, name: str) -> stacks.Container:
        containers = await asyncio.to_thread(self.containers)
        if name not in containers:
            raise RuntimeError(f"{name}: no such container in compose project {self.project}")
        return containers[name]

    async def _docker(self, action: str, name: str, *options: str) -> None:
        container = await self._container(name)
        await _run("docker", action, *options, container.id)

    async def kill(self, name: str) -> None:
        await self._docker("kill", name, "--signal", "KILL")
        # A restart policy ignores a container that was killed on purpose: start it again,
        # as supervisord does for the local stack.
        await self._docker("start", name)

    async def pause(self, name: str) -> None:
        await self._docker("pause", name)

    async def resume(self, name: str) -> None:
        await self._docker("unpause", name)

    async def restart(self, name: str) -> None:
        await self._docker("restart", name)
