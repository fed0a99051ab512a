"""Partitions on the compose stack: a chain in each side's own network namespace.

Each container has its network namespace; the cut's chain is created inside it from the host
(``nsenter -t <pid> -n iptables``, the pid from ``docker inspect``), jumped to from INPUT and
OUTPUT, and drops what comes from or goes to the other side's addresses. Both sides get it,
so the cut holds even if one side's rules were lost. The images need nothing: the host's
``iptables`` runs in the container's namespace. Only the pair is cut: the host still reaches
both through their published ports, and both still reach everyone else.

A container killed and started again gets a new namespace (and maybe a new address): the
cut is put back at the next refresh (every second while ``--for`` holds it, or by running the
same ``partition`` again).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ordermesh_deploy import stacks
from ordermesh_deploy.partition import ALL, Cut, PartitionError, Rule, drop_chain, sync_chain

HOOKS = ("INPUT", "OUTPUT")


class ComposeCutter:
    """Cuts between the compose project's containers (see the module's docstring)."""

    kind = "compose"
    chain_prefix = "OMCUT-compose"

    def __init__(self, project: str, *, state_dir: Path) -> None:
        self.project = project
        self.state_file = state_dir / f"partitions-{project}.json"

    def containers(self) -> list[stacks.Container]:
        """The project's containers as they are now."""
        return stacks.project_containers(self.project)

    def components(self) -> list[str]:
        containers = self.containers()
        return [*sorted({c.service for c in containers}), *(c.name for c in containers)]

    def sides(self, cut: Cut) -> tuple[list[stacks.Container], list[stacks.Container]]:
        """A's containers and B's (``all``: every other container of the project)."""
        containers = self.containers()
        a = [c for c in containers if cut.a in (c.service, c.name)]
        b = [c for c in containers if c not in a and (cut.b == ALL or cut.b in (c.service, c.name))]
        return a, b

    def apply(self, cut: Cut) -> None:
        a, b = self.sides(cut)
        pids = _pids([c.id for c in (*a, *b)])
        applied: dict[str, list[Rule]] = cut.state.get("applied", {})
        for mine, theirs in ((a, b), (b, a)):
            addresses = sorted({ip for c in theirs for ip in c.addresses})
            rules = [[flag, ip, "-j", "DROP"] for ip in addresses for flag in ("-s", "-d")]
            for container in mine:
                if pids.get(container.id):
                    applied[container.id] = sync_chain(
                        cut.chain,
                        rules,
                        applied=applied.get(container.id, []),
                        hooks=HOOKS,
                        pid=pids[container.id],
                    )
        if not applied:
            raise PartitionError(
                f"none of {cut.a}'s or {cut.b}'s containers is running: `make up` starts them"
            )
        cut.state = {"applied": applied}

    def remove(self, cut: Cut, *, remaining: list[Cut]) -> None:
        # A container that is gone or stopped took its namespace, and the chain, with it.
        for pid in _pids(list(cut.state.get("applied", {}))).values():
            if pid:
                drop_chain(cut.chain, HOOKS, pid)


def _pids(ids: list[str]) -> dict[str, int]:
    """container id -> its main process (0: not running), for the containers still there."""
    if not ids:
        return {}
    result = subprocess.run(
        ["docker", "inspect", *ids], capture_output=True, text=True, check=False
    )
    return {info["Id"]: info["State"]["Pid"] for info in json.loads(result.stdout or "[]")}
