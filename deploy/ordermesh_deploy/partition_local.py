"""Partitions on the local stack: cgroups and the host's OUTPUT chain, IPv4 loopback only.

Every process listens on 127.0.0.1, so addresses cannot tell the two sides apart. A service
instance's processes (supervisord's child and its descendants) move into a cgroup v2 group of
their own, ``ordermesh-chaos/<stack>/<program>``, and the cut's chain drops what that group
sends to the other side's listening ports (``-m cgroup --path``): a connection is dead as soon
as one direction is. A socket keeps the cgroup it was created in, so connections that were
open before the move (pools, keep-alive) are found in ``/proc`` and dropped by their ports,
both ways. PostgreSQL, RabbitMQ and etcd only ever answer, so they are cut by their ports and
never moved. A restarted instance (new pid) is taken in at the next refresh: every second
while ``--for`` holds a cut, or by running the same ``partition`` again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ordermesh_deploy import local
from ordermesh_deploy.partition import ALL, Cut, PartitionError, Rule, drop_chain, sync_chain

HOOKS = ("OUTPUT",)  # loopback packets all pass OUTPUT, carrying the sending socket's cgroup
CGROUP_DIR = "ordermesh-chaos"
SERVERS = ("postgres", "rabbitmq", "etcd")
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Member:
    """One side's part: a service instance (``program``) or a server only reached by port."""

    name: str
    port: int
    program: str | None


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or ``.../unified``)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, *_ = line.split()
        if kind == "cgroup2":
            return Path(where)
    raise PartitionError(
        "no cgroup v2 hierarchy is mounted here, which local partitions need:"
        " mount -t cgroup2 none /sys/fs/cgroup/unified"
    )


class LocalCutter:
    """Cuts between the local stack's programs and servers (see the module's docstring)."""

    kind = "local"

    def __init__(self, stack: local.Stack) -> None:
        self.stack = stack
        run_dir = Path(stack.run_dir).resolve()
        self.state_file = run_dir / "partitions.json"
        # Several stacks share the host's tables: each names its chains and cgroups apart.
        self.key = hashlib.sha1(str(run_dir).encode()).hexdigest()[:6]
        self.chain_prefix = f"OMCUT-{self.key}"

    # --- names -------------------------------------------------------------------------------

    def components(self) -> list[str]:
        services = sorted({program.rpartition("-")[0] for program in self.stack.instances})
        return [*services, *self.stack.instances, *SERVERS]

    def members(self, name: str) -> list[Member]:
        """The instances a service's name means, the instance named, or the server."""
        if name in SERVERS:
            return [Member(name, self._server_port(name), None)]
        programs = [p for p in self.stack.instances if name in (p, p.rpartition("-")[0])]
        return [Member(p, _port(self.stack.instances[p]), p) for p in programs]

    def sides(self, cut: Cut) -> tuple[list[Member], list[Member]]:
        """A's members and B's (``all``: every member of every other component)."""
        a = self.members(cut.a)
        if cut.b != ALL:
            return a, self.members(cut.b)
        everyone = [*self.stack.instances, *SERVERS]
        taken = {m.name for m in a}
        return a, [m for n in everyone if n not in taken for m in self.members(n)]

    def _server_port(self, name: str) -> int:
        url = {
            "postgres": self.stack.postgres_url,
            "rabbitmq": self.stack.rabbitmq_url,
            "etcd": self.stack.etcd_url,
        }[name]
        default = {"postgres": 5432, "rabbitmq": 5672, "etcd": 2379}[name]
        return urlsplit(url).port or default

    # --- applying and removing ---------------------------------------------------------------

    def apply(self, cut: Cut) -> None:
        a, b = self.sides(cut)
        directions = [(x, y) for x in a for y in b] + [(y, x) for x in a for y in b]
        directions = [(src, dst) for src, dst in directions if src.program]
        if not directions:
            raise PartitionError(
                f"{cut.a} and {cut.b} never connect to each other on the local stack"
                " (servers only answer): name a service on one side"
            )
        processes = self._processes()
        rules = self._cgroup_rules(directions, processes)
        # Kept from earlier refreshes: a connection found once stays cut while it lives.
        earlier = {tuple(t) for t in cut.state.get("tuples", [])}
        tuples = earlier | _open_connections(directions, processes)
        rules += [rule for t in sorted(tuples) for rule in _tuple_rules(t)]
        applied = cut.state.get("applied", [])
        cut.state = {
            "programs": sorted({src.program for src, _ in directions if src.program}),
            "tuples": sorted(tuples),
            "applied": sync_chain(cut.chain, rules, applied=applied, hooks=HOOKS, pid=None),
        }

    def _cgroup_rules(
        self, directions: list[tuple[Member, Member]], processes: dict[str, list[int]]
    ) -> list[Rule]:
        rules = []
        for src, dst in directions:
            assert src.program is not None
            path = self._enter(src.program, processes.get(src.program, []))
            match = ["-p", "tcp", "-d", "127.0.0.1", "--dport", str(dst.port)]
            rules.append([*match, "-m", "cgroup", "--path", path, "-j", "DROP"])
        return rules

    def _enter(self, program: str, pids: list[int]) -> str:
        """Move ``pids`` into ``program``'s cgroup; its path as iptables names it."""
        relative = f"{CGROUP_DIR}/{self.key}/{program}"
        group = cgroup2_root() / relative
        group.mkdir(parents=True, exist_ok=True)
        for pid in pids:
            _move(pid, group)
        return relative

    def remove(self, cut: Cut, *, remaining: list[Cut]) -> None:
        drop_chain(cut.chain, HOOKS, None)
        still = {p for other in remaining for p in other.state.get("programs", [])}
        for program in set(cut.state.get("programs", [])) - still:
            self._leave(program)

    def _leave(self, program: str) -> None:
        """Move ``program``'s processes back beside supervisord and remove its cgroup."""
        root = cgroup2_root()
        group = root / CGROUP_DIR / self.key / program
        if not group.exists():
            return
        home = root / self._supervisord_cgroup().lstrip("/")
        for pid in (group / "cgroup.procs").read_text().split():
            _move(int(pid), home)
        for empty in (group, group.parent, group.parent.parent):
            try:
                empty.rmdir()
            except OSError:  # another stack's or another program's cgroup is still there
                break

    # --- processes ---------------------------------------------------------------------------

    def _supervisord_pid(self) -> int | None:
        try:
            return int((Path(self.stack.run_dir) / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _supervisord_cgroup(self) -> str:
        pid = self._supervisord_pid()
        return _cgroup_of(pid) if pid else "/"

    def _processes(self) -> dict[str, list[int]]:
        """program -> its process and descendants, told apart by the PORT each was given."""
        pid = self._supervisord_pid()
        if pid is None or not local.supervisord_running(Path(self.stack.run_dir)):
            raise PartitionError(
                f"the local stack in {self.stack.run_dir} is not running: start it with `make dev`"
            )
        by_port = {_port(url): program for program, url in self.stack.instances.items()}
        found: dict[str, list[int]] = {}
        for child in _children(pid):
            program = by_port.get(_env_port(child))
            if program:
                found.setdefault(program, []).extend([child, *_descendants(child)])
        return found


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def _move(pid: int, group: Path) -> None:
    # Gone meanwhile: its successor is taken in at the next refresh.
    with contextlib.suppress(ProcessLookupError):
        (group / "cgroup.procs").write_text(str(pid))


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return kids + [grandchild for kid in kids for grandchild in _descendants(kid)]


def _env_port(pid: int) -> int:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return 0
    port = next((v[5:] for v in environ if v.startswith(b"PORT=")), b"0")
    return int(port) if port.isdigit() else 0


Tuple4 = tuple[str, int, str, int]


def _open_connections(
    directions: list[tuple[Member, Member]], processes: dict[str, list[int]]
) -> set[Tuple4]:
    """(local ip, port, remote ip, port) of each connection a side opened to the other's
    ports before its processes moved (those sockets keep their old cgroup)."""
    sockets = _tcp_sockets()
    found = set()
    for src, dst in directions:
        for pid in processes.get(src.program or "", []):
            for inode in _socket_inodes(pid):
                conn = sockets.get(inode)
                if conn is not None and conn[3] == dst.port:
                    found.add(conn)
    return found


def _tcp_sockets() -> dict[str, Tuple4]:
    """inode -> (local ip, port, remote ip, port) of every IPv4 TCP socket not listening."""
    sockets = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != TCP_LISTEN:
            local_ip, local_port = _address(fields[1])
            remote_ip, remote_port = _address(fields[2])
            sockets[fields[9]] = (local_ip, local_port, remote_ip, remote_port)
    return sockets


def _address(text: str) -> tuple[str, int]:
    # /proc/net/tcp writes 127.0.0.1:5432 as 0100007F:1538 (address in host byte order).
    hex_ip, hex_port = text.split(":")
    ip = ".".join(str(b) for b in reversed(bytes.fromhex(hex_ip)))
    return ip, int(hex_port, 16)


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tuple_rules(conn: Tuple4 | tuple[object, ...]) -> list[Rule]:
    local_ip, local_port, remote_ip, remote_port = (str(part) for part in conn)
    out = ["-p", "tcp", "-s", local_ip, "--sport", local_port, "-d", remote_ip]
    back = ["-p", "tcp", "-s", remote_ip, "--sport", remote_port, "-d", local_ip]
    return [
        [*out, "--dport", remote_port, "-j", "DROP"],
        [*back, "--dport", local_port, "-j", "DROP"],
    ]
