"""An etcd lock taken and released about once a second, one line per attempt: `make demo-cap`'s
view of a CP path from inside a service's network position.

``demo_cap`` runs it where a service instance would take a lock: on the local stack as a
process moved into the cut instance's cgroup, on compose inside the order container
(``docker exec ... python3 - URL`` with this file on stdin: it needs only the shared library,
which every image has). Each line is ``<epoch seconds> held <token> <ms>`` or
``<epoch seconds> refused <error type> <ms>``. It stops after SECONDS (a ``docker exec``
whose client is killed leaves its process running in the container: it must end itself).

    python -m ordermesh_deploy.lock_probe http://127.0.0.1:2379 30
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

import structlog
from ordermesh_shared.coordination import CoordinationError, Lock
from ordermesh_shared.etcd_client import EtcdClient

LOCK = "/ordermesh/locks/demo-cap"
TTL = 2.0
# Bounds each etcd request: a cut etcd drops packets, so without it a try would hang.
REQUEST_TIMEOUT = 0.8
EVERY = 1.0


async def attempt(url: str) -> str:
    """Take the lock and let it go; what happened, as the rest of a probe line."""
    started = time.monotonic()
    try:
        # A client per attempt: new connections, so a cut made since applies to them.
        async with (
            EtcdClient(url, timeout=REQUEST_TIMEOUT) as etcd,
            Lock(etcd, LOCK, ttl=TTL).try_hold() as held,
        ):
            outcome = f"held {held.token}"
    except CoordinationError as exc:
        outcome = f"refused {type(exc).__name__}"
    return f"{outcome} {(time.monotonic() - started) * 1000:.0f}"


async def probe(url: str, *, seconds: float) -> None:
    """Attempt every ``EVERY`` s for ``seconds``, printing one line each."""
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        started = time.monotonic()
        print(f"{time.time():.3f} {await attempt(url)}", flush=True)
        await asyncio.sleep(max(0.0, EVERY - (time.monotonic() - started)))


def main() -> None:
    """``python -m ordermesh_deploy.lock_probe ETCD_URL SECONDS`` (or ``python3 - ...``)."""
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m ordermesh_deploy.lock_probe ETCD_URL SECONDS")
    # stdout carries the probe's lines only: the lock's own log lines would garble them.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(probe(sys.argv[1], seconds=float(sys.argv[2])))


if __name__ == "__main__":
    main()
