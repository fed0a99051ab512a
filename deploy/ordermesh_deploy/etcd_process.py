"""A private, throwaway etcd for tooling (demos): free loopback ports, killed on exit.

    async with PrivateEtcd(tmp_dir / "etcd") as etcd:
        print(etcd.url)  # http://127.0.0.1:<port>, healthy

Raft timings are short (heartbeat 25 ms, election 250 ms) so a single node is ready in a
fraction of a second; etcd derives its minimum lease TTL from them: 1 s here (2 s with
etcd's defaults). The binary is ``$ETCD_BINARY``, else ``etcd`` on the PATH, else
``/usr/bin/etcd`` (Debian: ``apt-get install etcd-server``, 3.4.23 on Debian 12).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

import httpx

HEARTBEAT_MS = 25
ELECTION_MS = 250
_START_TIMEOUT = 10.0


class EtcdNotFound(RuntimeError):
    """No etcd binary to start."""


def etcd_binary() -> Path:
    """Where the etcd binary is; EtcdNotFound (saying what to do) if nowhere."""
    candidate = os.environ.get("ETCD_BINARY") or shutil.which("etcd") or "/usr/bin/etcd"
    path = Path(candidate)
    if not path.is_file():
        raise EtcdNotFound(
            f"etcd not found at {path}: `apt-get install etcd-server` as root (`make deps` "
            "does it), set ETCD_BINARY, or pass --etcd-url of a running etcd"
        )
    return path


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so the ports are distinct
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class PrivateEtcd:
    """A single-node etcd under ``data_dir`` (its log in ``data_dir/etcd.log``)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port, self.peer_port = _free_ports(2)
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    async def __aenter__(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir / "etcd.log").open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("ETCD_")},
            )
        try:
            await self._wait_healthy()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()

    def _argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            str(etcd_binary()),
            "--name=demo",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=demo={peer}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--log-level=warn",
            "--logger=zap",
        ]

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        async with httpx.AsyncClient(timeout=0.5) as http:
            while time.monotonic() < deadline:
                if self._process is None or self._process.returncode is not None:
                    raise RuntimeError(f"etcd exited while starting; see {self._log()}")
                if await _healthy(http, self.url):
                    return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"etcd not healthy within {_START_TIMEOUT} s; see {self._log()}")

    def _log(self) -> Path:
        return self.data_dir / "etcd.log"


async def _healthy(http: httpx.AsyncClient, url: str) -> bool:
    try:
        answer = (await http.get(f"{url}/health")).json()
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(answer, dict) and answer.get("health") == "true"
