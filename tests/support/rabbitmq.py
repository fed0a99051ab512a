"""RabbitMQ for tests (a pytest plugin, loaded from tests/conftest.py).

Fixtures:

* ``rabbit_vhost`` — an AMQP URL to a fresh virtual host on the machine's shared broker
  (127.0.0.1:5672, or ``ORDERMESH_TEST_AMQP``), deleted with everything in it afterwards.
  Tests that only publish and consume use this: it costs ~1 s, not a broker start.
* ``private_rabbit`` — a RabbitMQ node of the test's own on random ports, free to stop, kill
  and start again (its data survives a restart). For outage tests: never stop the shared one.

A private node runs as the ``rabbitmq`` user (the broker refuses to run as root, and its files
must belong to that user), with its own epmd started here so stopping the node stops everything
it started (RabbitMQ's own epmd would outlive it). Starting takes ~3-5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import pytest
from ordermesh_shared.messaging.broker import Broker

from tests.support.etcd import free_ports

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = "rabbitmqctl"
SHARED_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
BROKER_USER = "rabbitmq"
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_FRAME_METHOD = 1


def shared_amqp_url() -> str:
    """The machine's shared broker (never stop it)."""
    return os.environ.get("ORDERMESH_TEST_AMQP", SHARED_AMQP)


def amqp_answers(port: int, *, timeout: float = 0.5) -> bool:
    """True when an AMQP 0-9-1 server on ``port`` answers the protocol header."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(_AMQP_HEADER)
            first = sock.recv(1)
    except OSError:
        return False
    # The listener opens near the end of boot; a Connection.Start frame means it is serving.
    return first == bytes([_FRAME_METHOD])


class PrivateRabbit:
    """A single RabbitMQ node on free loopback ports, with its data in a directory of its own.

    >>> with PrivateRabbit() as rabbit:              # started and answering AMQP
    ...     connect(rabbit.url)
    ...     rabbit.stop(); rabbit.start()           # graceful stop; durable data kept
    ...     rabbit.kill(); rabbit.start()           # SIGKILL: a crash
    """

    def __init__(self) -> None:
        # Not under pytest's tmp_path: that is root-only (0700), and the broker runs as rabbitmq.
        self.base_dir = Path(tempfile.mkdtemp(prefix="om-rabbit-"))
        self.amqp_port, self.dist_port, self.epmd_port = free_ports(3)
        self.node_name = f"omtest{uuid.uuid4().hex[:8]}@localhost"
        self._broker: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._prepare_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def running(self) -> bool:
        return self._broker is not None and self._broker.poll() is None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the node and return once it answers AMQP on :attr:`amqp_port`."""
        if self.running:
            raise RuntimeError(f"private RabbitMQ already running on {self.amqp_port}")
        self._start_epmd()
        with (self.base_dir / "broker.log").open("ab") as log:
            self._broker = subprocess.Popen(
                [str(RABBITMQ_SERVER)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.base_dir,
                user=BROKER_USER,
                group=BROKER_USER,
                # Its own process group: stop/kill reach the shell wrapper and the Erlang VM.
                start_new_session=True,
            )
        self._wait_serving(timeout)

    def stop(self, *, timeout: float = 20.0) -> None:
        """Graceful shutdown (SIGTERM: the wrapper script stops the node cleanly)."""
        self._signal_broker(signal.SIGTERM)
        try:
            self._reap(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the node's whole process group: a crash."""
        self._signal_broker(signal.SIGKILL)
        self._reap(10)

    def close(self) -> None:
        """Kill the node and its epmd, and delete its files."""
        self.kill()
        if self._epmd is not None and self._epmd.poll() is None:
            self._epmd.kill()
            self._epmd.wait(timeout=10)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.base_dir / "broker.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _prepare_files(self) -> None:
        # The system's rabbitmq.conf pins port 5672 and rabbitmq-env.conf the node name:
        # point the node at files of its own so nothing of the shared broker is reused.
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
        )
        (self.base_dir / "rabbitmq-env.conf").write_text("")
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        owner = pwd.getpwnam(BROKER_USER)
        for path in [self.base_dir, *self.base_dir.iterdir()]:
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def _env(self) -> dict[str, str]:
        base = self.base_dir
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(base),  # the Erlang cookie lands here, private to this node
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ERL_ARGS": "+S 1:1",  # one scheduler: the machine has two cores
        }

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        self._epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not amqp_answers(self.amqp_port):
            if not self.running:
                raise RuntimeError(f"private RabbitMQ exited while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"private RabbitMQ not serving in {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _signal_broker(self, sig: signal.Signals) -> None:
        if self.running and self._broker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._broker.pid, sig)

    def _reap(self, timeout: float) -> None:
        if self._broker is None:
            return
        self._broker.wait(timeout=timeout)
        # The wrapper may exit before the VM it started: finish the group off.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._broker.pid, signal.SIGKILL)


def _require_rabbitmq() -> None:
    if not RABBITMQ_SERVER.is_file():
        pytest.skip(f"RabbitMQ is not installed at {RABBITMQ_SERVER} (apt install rabbitmq-server)")
    try:
        pwd.getpwnam(BROKER_USER)
    except KeyError:
        pytest.skip(f"no {BROKER_USER!r} user to run a private RabbitMQ node as")
    if os.geteuid() != 0:
        pytest.skip("a private RabbitMQ node must be started as root (it switches to rabbitmq)")


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node for one test; killed and deleted afterwards whatever its state."""
    _require_rabbitmq()
    with PrivateRabbit() as rabbit:
        yield rabbit


def _rabbitmqctl(*args: str) -> None:
    subprocess.run([RABBITMQCTL, "-q", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def rabbit_vhost() -> Iterator[str]:
    """An AMQP URL to a virtual host of this test's own on the shared broker."""
    if shutil.which(RABBITMQCTL) is None:
        pytest.skip("rabbitmqctl is needed to create a private virtual host")
    vhost = f"om-test-{uuid.uuid4().hex[:12]}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot create vhost on the shared broker: {exc.stderr.decode()}")
    base = shared_amqp_url().rstrip("/")
    try:
        yield f"{base}/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
async def broker(rabbit_vhost: str) -> AsyncIterator[Broker]:
    """A connected :class:`Broker` on this test's own vhost."""
    async with Broker(rabbit_vhost, name="test") as connected:
        async with asyncio.timeout(10):
            await connected.connected.wait()
        yield connected
