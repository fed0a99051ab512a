"""Child processes for tests: started, signalled (kill, pause, resume) and always reaped.

A child's stdout and stderr go to a log file, so a test can wait for a line ("ready") and a
failure message can quote what the child said.

    with python_child(SCRIPT, "arg", log_path=tmp_path / "child.log") as child:
        await child.wait_for_output("registered", timeout=5)
        child.kill()
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

_POLL_INTERVAL = 0.02
_LOG_TAIL_CHARS = 2000


class ChildProcess:
    """One child process; usable as a context manager that kills and reaps it on exit."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

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

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.argv[0]} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self) -> None:
        """Start the process (again, after it stopped), appending to the same log file."""
        if self.running:
            raise RuntimeError(f"{self.argv[0]} is already running (pid {self.pid})")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,  # a Ctrl-C aimed at pytest must not hit the child first
            )

    def output(self) -> str:
        """Everything the process wrote so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        """A one-paragraph account for assertion messages: state and the tail of the log."""
        state = "running" if self.running else f"exited with {self.returncode}"
        return f"{self.argv[0]} ({state}); log {self.log_path}:\n{self.output()[-_LOG_TAIL_CHARS:]}"

    # Our own timeout rather than the caller's asyncio.timeout: the failure quotes the log.
    async def wait_for_output(self, text: str, *, timeout: float) -> None:
        """Wait (without blocking the event loop) until ``text`` appears in the output."""
        deadline = time.monotonic() + timeout
        while True:  # polling a file: there is no event to wait on
            if self._has_output(text, deadline):
                return
            await asyncio.sleep(_POLL_INTERVAL)

    def wait_for_output_sync(self, text: str, *, timeout: float) -> None:
        """Like :meth:`wait_for_output`, for synchronous code."""
        deadline = time.monotonic() + timeout
        while not self._has_output(text, deadline):
            time.sleep(_POLL_INTERVAL)

    def _has_output(self, text: str, deadline: float) -> bool:
        if text in self.output():
            return True
        if not self.running:
            raise AssertionError(f"exited before writing {text!r}: {self.describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"did not write {text!r} in time: {self.describe()}")
        return False

    def kill(self) -> None:
        """SIGKILL (works on a paused process too) and reap; no-op if not running."""
        if self.running:
            self.signal(signal.SIGKILL)
        self._reap(timeout=10)

    def stop(self, *, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; reaps it."""
        if not self.running:
            self._reap(timeout=timeout)
            return
        self.resume()  # a stopped process only sees SIGTERM once continued
        self.signal(signal.SIGTERM)
        try:
            self._reap(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        """SIGSTOP: the process freezes, its sockets stay open (a long GC pause, a VM stall)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def _reap(self, *, timeout: float) -> None:
        if self._proc is not None:
            self._proc.wait(timeout=timeout)


def python_child(
    code: str,
    *args: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ChildProcess:
    """A child running ``code`` with this interpreter (and its installed packages), unbuffered.

    ``args`` arrive as ``sys.argv[1:]``.
    """
    argv = [sys.executable, "-u", "-c", code, *args]
    return ChildProcess(argv, log_path=log_path, env=env, cwd=cwd)
