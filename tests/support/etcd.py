"""Private etcd servers for tests (a pytest plugin, loaded from tests/conftest.py).

Fixtures:

* ``etcd_server`` — a fresh single-node etcd for one test, free to kill, stop, restart and pause.
* ``shared_etcd`` — one etcd for the whole session, for tests that only read and write keys
  (give each test its own key prefix, e.g. with ``etcd_prefix``).

The servers use short raft timings (heartbeat 25 ms, election 250 ms) so a single node is
ready in ~0.2 s and back ~0.3 s after a restart. etcd's minimum lease TTL follows from those
timings, ceil(1.5 x election timeout): **1 s** here (with etcd's defaults it is 2 s). A lease
granted with a shorter TTL silently gets the minimum.

Every test is skipped with a reason when the etcd binary is missing (Debian: ``etcd-server``;
``ETCD_BINARY`` overrides the path).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import pytest

from tests.support.procs import ChildProcess

DEFAULT_ETCD_BINARY = "/usr/bin/etcd"
HEARTBEAT_MS = 25
ELECTION_MS = 250
MIN_LEASE_TTL = 1  # seconds; see the module docstring
_START_ATTEMPTS = 3  # a "free" port can be taken by someone else before etcd binds it


def etcd_binary() -> Path:
    return Path(os.environ.get("ETCD_BINARY", DEFAULT_ETCD_BINARY))


def free_port() -> int:
    """A loopback port nothing listens on right now (nor, most likely, a moment later)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: all are held open while picking."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class EtcdServer:
    """A single-node etcd on two free loopback ports, with its data under ``data_dir``.

    >>> with EtcdServer(tmp_path / "etcd") as etcd:      # started, healthy
    ...     etcd.kill(); etcd.start()                     # same data, same ports
    ...     etcd.kill(); etcd.wipe(); etcd.start()        # a new empty cluster, same ports
    ...     etcd.pause(); etcd.resume()                   # SIGSTOP / SIGCONT
    """

    def __init__(self, data_dir: Path, *, binary: Path | None = None) -> None:
        self.data_dir = data_dir
        self.binary = binary or etcd_binary()
        self.client_port, self.peer_port = free_ports(2)
        self._process: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def start(self, *, timeout: float = 10.0) -> None:
        """Start etcd and return once ``/health`` says it is healthy (it has a leader).

        The first start retries on fresh ports if the chosen ones were taken meanwhile; a
        restart keeps its ports so clients can reconnect to the same URL.
        """
        if self.running:
            raise RuntimeError(f"etcd is already running at {self.url}")
        first_start = self._process is None
        for attempt in range(1, _START_ATTEMPTS + 1):
            process = self._launch()
            try:
                self._wait_healthy(process, timeout=timeout)
                return
            except RuntimeError:
                process.kill()
                if not first_start or attempt == _START_ATTEMPTS or not self._port_taken(process):
                    raise
                self.client_port, self.peer_port = free_ports(2)

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM)."""
        if self._process is not None:
            self._process.stop()

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        if self._process is not None:
            self._process.kill()

    def wipe(self) -> None:
        """Delete etcd's data while it is down: the next start is a brand-new, empty cluster."""
        if self.running:
            raise RuntimeError("stop or kill etcd before wiping its data")
        shutil.rmtree(self.data_dir / "data", ignore_errors=True)

    def pause(self) -> None:
        """SIGSTOP: etcd freezes; its sockets stay open and connections hang."""
        self._require_process().pause()

    def resume(self) -> None:
        self._require_process().resume()

    def describe(self) -> str:
        return self._require_process().describe()

    def _require_process(self) -> ChildProcess:
        if self._process is None:
            raise RuntimeError("etcd was never started")
        return self._process

    def _launch(self) -> ChildProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            str(self.binary),
            "--name=test",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--logger=zap",
            "--log-level=warn",
        ]
        # etcd reads ETCD_* variables as flags: keep the caller's environment out of it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self._process = ChildProcess(argv, log_path=self.data_dir / "etcd.log", env=env)
        self._process.start()
        return self._process

    def _wait_healthy(self, process: ChildProcess, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=0.5) as http:
            while time.monotonic() < deadline:
                if not process.running:
                    raise RuntimeError(f"etcd exited while starting: {process.describe()}")
                if self._healthy(http):
                    return
                time.sleep(0.02)
        raise RuntimeError(f"etcd not healthy within {timeout} s: {process.describe()}")

    def _healthy(self, http: httpx.Client) -> bool:
        try:
            answer = http.get(f"{self.url}/health").json()
        except (httpx.HTTPError, ValueError):
            return False
        return isinstance(answer, dict) and answer.get("health") == "true"

    @staticmethod
    def _port_taken(process: ChildProcess) -> bool:
        return "address already in use" not in process.output()


def _require_etcd() -> None:
    if not etcd_binary().is_file():
        pytest.skip(f"etcd not installed at {etcd_binary()} (apt install etcd-server)")


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd for one test; killed afterwards whatever state the test left it in."""
    _require_etcd()
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the session: do not kill or pause it; use your own key prefix."""
    _require_etcd()
    with EtcdServer(tmp_path_factory.mktemp("shared-etcd")) as server:
        yield server


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, for tests sharing ``shared_etcd``."""
    return f"/test-{uuid.uuid4().hex[:12]}/"
