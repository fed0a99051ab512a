"""``ordermesh-outbox``: look at a service's outbox relay fence, and re-base it after etcd
lost its data.

    $ ordermesh-outbox fence --service order
    $ ordermesh-outbox rebase-fence --service order                       # shows, changes nothing
    $ ordermesh-outbox rebase-fence --service order --confirm-etcd-reset  # re-bases

Each relay term's fencing token is an etcd revision; Postgres keeps the highest one it
accepted. If etcd's data is wiped, its revisions start again at 1 and every new relay term is
refused (``/health/ready``: ``outbox_relay`` ``fenced_out``, status ``degraded``): no event is
published. ``rebase-fence`` sets the stored token to the current etcd's relay term, through a
running instance's admin API (``POST /admin/outbox/fence/rebase``: the instance has the
database and etcd clients), which refuses when etcd's revision is not below the stored token
(nothing to fix) or the stored token was accepted moments ago (a relay of the old etcd may
still publish). Confirm only once every instance of the service uses the current etcd: a relay
still attached to the old one would be let in again.

It calls an instance of the running stack (local or compose; ``--target``) with the stack's
admin token, or the instance ``--url`` names with ``--admin-token`` / ``$ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import httpx
from ordermesh_shared.admin import ADMIN_TOKEN_HEADER

from ordermesh_deploy import local, stacks

FENCE = "/admin/outbox/fence"


class AdminCallFailed(Exception):
    """The instance answered with an error; the message is its ``detail``."""


def fence_lines(status: dict[str, Any]) -> list[str]:
    """The fence as a person reads it."""
    leader = status.get("etcd_leader")
    lines = [
        f"service:         {status['service']} (fence {status['resource']})",
        f"stored token:    {status['stored_token']}"
        + _ago(status.get("last_accepted_seconds_ago")),
        f"etcd revision:   {status['etcd_revision']} at {status['etcd_url']}",
        f"relay leader:    {leader or 'nobody'}"
        + (f" (term token {status['etcd_leader_token']})" if leader else ""),
    ]
    here = status.get("relay_here")
    if here:
        lines.append(f"relay (this instance): {here.get('state')}")
    return lines


def _ago(seconds: float | None) -> str:
    return "" if seconds is None else f" (last accepted {seconds:.1f} s ago)"


async def show_fence(client: httpx.AsyncClient, *, out: TextIO) -> int:
    """``fence``: print the fence and whether etcd fell behind it."""
    status = await get_fence(client)
    print("\n".join(fence_lines(status)), file=out)
    if status["etcd_behind"]:
        print(
            f"etcd is behind the fence: no relay term can get in; see `rebase-fence --service"
            f" {status['service']}`",
            file=out,
        )
    return 0


async def rebase_fence(client: httpx.AsyncClient, *, confirm: bool, out: TextIO) -> int:
    """``rebase-fence``: show the fence; with ``confirm``, re-base it. 0 when re-based."""
    status = await get_fence(client)
    print("\n".join(fence_lines(status)), file=out)
    stored, revision, service = status["stored_token"], status["etcd_revision"], status["service"]
    if not status["etcd_behind"]:
        print(
            f"nothing to fix: etcd's revision {revision} is not below the stored token"
            f" {stored}, so new relay terms get in",
            file=out,
        )
        return 1
    target = status["rebase_to"]
    if not confirm:
        print(
            f"would set the stored token {stored} -> {target}. Make sure every {service}"
            f" instance uses etcd at {status['etcd_url']} (no relay of the old etcd can still"
            " run), then re-run with --confirm-etcd-reset",
            file=out,
        )
        return 1
    body = {"confirm_etcd_reset": True, "expected_stored_token": stored}
    done = await _call(client, "POST", f"{FENCE}/rebase", json=body)
    print(
        f"re-based: stored token {done['previous_token']} -> {done['token']}; the relay lets"
        " its next term in (the leading instance within its poll interval)",
        file=out,
    )
    return 0


async def get_fence(client: httpx.AsyncClient) -> dict[str, Any]:
    """``GET /admin/outbox/fence`` (raises AdminCallFailed with the instance's answer)."""
    status: dict[str, Any] = await _call(client, "GET", FENCE)
    return status


async def _call(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Any:
    response = await client.request(method, path, **kwargs)
    if response.status_code != 200:
        raise AdminCallFailed(f"{method} {path}: {response.status_code} {_detail(response)}")
    return response.json()


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return str(detail) if detail else response.text[:300]


def instance_urls(instances: dict[str, str], service: str) -> list[str]:
    """The base URLs of ``service``'s instances (``order-1``, ``order-2``...), in order."""
    names = sorted(n for n in instances if n.rsplit("-", 1)[0] == service)
    return [instances[n] for n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ordermesh-outbox",
        description="Look at a service's outbox relay fence (Postgres) beside etcd's revision,"
        " and re-base it after etcd lost its data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("fence", help="show the stored token, etcd's revision and the leader")
    rebase = sub.add_parser(
        "rebase-fence",
        help="set the stored token to the current etcd's relay term (after etcd lost its"
        " data); without --confirm-etcd-reset it only shows what it would do",
    )
    rebase.add_argument(
        "--confirm-etcd-reset",
        action="store_true",
        help="you checked that etcd lost its data and every instance of the service uses the"
        " current etcd (no relay of the old one can still run)",
    )
    for command in (show, rebase):
        command.add_argument(
            "--service", required=True, choices=list(local.SERVICES), help="whose outbox"
        )
        command.add_argument(
            "--url",
            help="an instance's base URL (default: the running stack's instances of --service)",
        )
        command.add_argument(
            "--admin-token",
            default=None,
            help="X-Admin-Token (default: the stack's own; $ADMIN_TOKEN with --url)",
        )
        stacks.add_target_arguments(command)
    return parser


def _where(args: argparse.Namespace) -> tuple[list[str], str]:
    if args.url:
        token = args.admin_token or os.environ.get("ADMIN_TOKEN", "")
        if not token:
            raise SystemExit("ordermesh-outbox: --url needs --admin-token (or $ADMIN_TOKEN)")
        return [args.url], token
    stack = stacks.find_or_exit(args.target, run_dir=args.run_dir)
    urls = instance_urls(stacks.or_exit(lambda: stack.instances), args.service)
    if not urls:
        raise SystemExit(f"ordermesh-outbox: the {stack.kind} stack runs no {args.service}")
    return urls, args.admin_token or stacks.or_exit(lambda: stack.admin_token)


async def run(args: argparse.Namespace, *, out: TextIO) -> int:
    """Ask the first instance that answers; every instance sees the same fence and etcd."""
    urls, token = _where(args)
    for url in urls:
        async with httpx.AsyncClient(
            base_url=url, headers={ADMIN_TOKEN_HEADER: token}, timeout=10.0
        ) as client:
            try:
                if args.command == "fence":
                    return await show_fence(client, out=out)
                return await rebase_fence(client, confirm=args.confirm_etcd_reset, out=out)
            except httpx.TransportError as exc:
                print(f"{url} does not answer ({exc!r}); trying the next instance", file=out)
    print(f"ordermesh-outbox: no {args.service} instance answered", file=out)
    return 1


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ordermesh-outbox``."""
    args = build_parser().parse_args(argv)
    try:
        sys.exit(asyncio.run(run(args, out=sys.stdout)))
    except AdminCallFailed as exc:
        print(f"ordermesh-outbox: refused: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
