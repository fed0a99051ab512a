"""Network partitions on demand: cut the network between two components, then heal it.

A cut is packet filtering in a chain of its own (``OMCUT-<stack>-<n>``), jumped to from the
filter table's built-in chains; ``heal`` removes the jumps and the chain, so the rule set is
as it was. How the packets are told apart depends on the stack:

- compose (``partition_compose``): each container has its own network namespace, so the chain
  lives inside each side's namespace (``nsenter -n``) and drops what comes from or goes to the
  other side's addresses.
- local (``partition_local``): every process shares the host's loopback, so a service's
  processes move into a cgroup of their own and the host's OUTPUT chain drops what that cgroup
  sends to the other side's listening ports (``-m cgroup --path``); connections opened before
  the move keep their old cgroup, so each one found in ``/proc`` is dropped by its ports.

Active cuts are kept in a JSON file in the run directory, so ``heal`` works from any shell.

    >>> cut = create(cutter, "order", "inventory", hold=10.0)
    >>> await keep(cutter, cut)          # takes in a restarted process, then heals
    >>> heal(cutter)                     # or: every cut still in place
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

ALL = "all"  # B meaning every other component: `partition etcd all`
REFRESH_EVERY = 1.0  # seconds between looks for a restarted member while a cut is held


class PartitionError(Exception):
    """A partition that cannot be made or healed, said in one line with its fix."""


@dataclass
class Cut:
    """One partition between ``a`` and ``b`` (``all``: every other component)."""

    id: int
    kind: str
    a: str
    b: str
    chain: str
    until: float | None = None  # epoch seconds when `--for` heals it; None: until `heal`
    state: dict[str, Any] = field(default_factory=dict)  # what the backend needs to heal

    def describe(self) -> str:
        """``order <-> inventory (heals in 7 s)``, for people."""
        left = "until `ordermesh-chaos heal`"
        if self.until is not None:
            left = f"heals in {max(0.0, self.until - time.time()):.0f} s"
        return f"{self.a} <-> {self.b} ({left}; chain {self.chain})"


class Cutter(Protocol):
    """What cuts a stack's network: names its components, applies and heals cuts."""

    kind: str
    state_file: Path
    chain_prefix: str

    def components(self) -> list[str]:
        """Every name that ``partition`` accepts for A or B (``all`` aside)."""
        ...

    def apply(self, cut: Cut) -> None:
        """Put the cut in place, or bring it up to date (a restarted member); idempotent."""
        ...

    def remove(self, cut: Cut, *, remaining: list[Cut]) -> None:
        """Take the cut away, leaving nothing behind that none of ``remaining`` needs."""
        ...


def require_privileges() -> None:
    """Raise PartitionError unless this process may change packet filters."""
    if os.geteuid() != 0:
        raise PartitionError(
            "partitions change packet filters and cgroups, which needs root:"
            " run it as root (sudo -E uv run ordermesh-chaos partition ...)"
        )
    if shutil.which("iptables") is None:
        raise PartitionError("iptables is not installed: apt-get install iptables")


def iptables(*args: str, netns_pid: int | None = None, check: bool = True) -> bool:
    """Run ``iptables -w`` (in the network namespace of ``netns_pid`` when given).

    Returns True when it succeeded; with ``check`` a failure raises PartitionError.
    """
    prefix = ["nsenter", "-t", str(netns_pid), "-n"] if netns_pid else []
    # -w: Docker and other tools edit the same tables; wait for the lock instead of failing.
    command = [*prefix, "iptables", "-w", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise PartitionError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.returncode == 0


Rule = list[str]


def sync_chain(
    chain: str, rules: list[Rule], *, applied: list[Rule], hooks: tuple[str, ...], pid: int | None
) -> list[Rule]:
    """Make ``chain`` hold ``rules`` and be jumped to first from ``hooks``; returns the rules
    now in it. ``applied`` (what an earlier call put there) spares rewriting a chain that only
    gains rules: a cut is brought up to date every second while it is held."""
    fresh = iptables("-N", chain, netns_pid=pid, check=False)
    if not fresh and any(rule not in rules for rule in applied):
        iptables("-F", chain, netns_pid=pid)  # an address changed (a container came back)
        applied = []
    elif fresh:
        applied = []  # a new network namespace (a restarted container), or the first time
    for rule in rules:
        if rule not in applied:
            iptables("-A", chain, *rule, netns_pid=pid)
    for hook in hooks:
        if not iptables("-C", hook, "-j", chain, netns_pid=pid, check=False):
            iptables("-I", hook, "1", "-j", chain, netns_pid=pid)
    return rules


def drop_chain(chain: str, hooks: tuple[str, ...], pid: int | None) -> None:
    """Remove every jump to ``chain`` and the chain itself (gone already is fine)."""
    for hook in hooks:
        while iptables("-D", hook, "-j", chain, netns_pid=pid, check=False):
            pass
    if iptables("-F", chain, netns_pid=pid, check=False):
        iptables("-X", chain, netns_pid=pid)


# --- the cuts in force, kept beside the stack ------------------------------------------------


@contextmanager
def _locked(state_file: Path) -> Iterator[list[Cut]]:
    """The cuts in ``state_file``, written back on exit; one writer at a time."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with open(state_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cuts = load(state_file)
        try:
            yield cuts
        finally:  # a failed apply removed its cut: the file must say so too
            state_file.write_text(json.dumps([asdict(c) for c in cuts], indent=2) + "\n")


def load(state_file: Path) -> list[Cut]:
    """The cuts recorded in ``state_file`` (none when it is missing)."""
    if not state_file.exists():
        return []
    return [Cut(**item) for item in json.loads(state_file.read_text() or "[]")]


def _check_names(cutter: Cutter, a: str, b: str) -> None:
    known = cutter.components()
    for name in (a, b):
        if name not in known and not (name == b == ALL):
            raise PartitionError(
                f"{name}: not a component of the {cutter.kind} stack;"
                f" try {', '.join(known)} (and `{ALL}` for B)"
            )
    if a == b:
        raise PartitionError(f"{a} cannot be cut from itself: name two components")


def create(cutter: Cutter, a: str, b: str, *, hold: float | None) -> Cut:
    """Cut ``a`` from ``b`` (kept until ``heal`` unless ``hold`` seconds are given).

    The same pair again brings its cut up to date (a member restarted since) instead of
    adding a second one.
    """
    _check_names(cutter, a, b)
    with _locked(cutter.state_file) as cuts:
        cut = next((c for c in cuts if {c.a, c.b} == {a, b}), None)
        if cut is None:
            number = max((c.id for c in cuts), default=0) + 1
            chain = f"{cutter.chain_prefix}-{number}"
            cut = Cut(id=number, kind=cutter.kind, a=a, b=b, chain=chain)
            cuts.append(cut)
        cut.until = time.time() + hold if hold else None
        try:
            cutter.apply(cut)
        except PartitionError:
            cuts.remove(cut)
            cutter.remove(cut, remaining=cuts)
            raise
    return cut


def refresh(cutter: Cutter, cut: Cut) -> bool:
    """Bring ``cut`` up to date if it is still in force; False once healed (elsewhere)."""
    with _locked(cutter.state_file) as cuts:
        current = next((c for c in cuts if c.id == cut.id), None)
        if current is None:
            return False
        cutter.apply(current)
        return True


async def keep(cutter: Cutter, cut: Cut) -> None:
    """Hold ``cut`` until its time is up, taking in restarted members; then heal it.

    Healed on the way out even when cancelled, so a stopped tool leaves no cut behind.
    """
    try:
        while cut.until is not None and time.time() < cut.until:
            await asyncio.sleep(min(REFRESH_EVERY, max(0.0, cut.until - time.time())))
            if not await asyncio.to_thread(refresh, cutter, cut):
                return
    finally:
        await asyncio.shield(asyncio.to_thread(heal, cutter, cut.a, cut.b))


def heal(cutter: Cutter, a: str | None = None, b: str | None = None) -> list[Cut]:
    """Heal the cut between ``a`` and ``b`` (every cut when neither is given); the healed."""
    with _locked(cutter.state_file) as cuts:
        chosen = [c for c in cuts if _matches(c, a, b)]
        for cut in chosen:
            cuts.remove(cut)
            cutter.remove(cut, remaining=cuts)
    return chosen


def _matches(cut: Cut, a: str | None, b: str | None) -> bool:
    wanted = {name for name in (a, b) if name}
    return wanted <= {cut.a, cut.b}
