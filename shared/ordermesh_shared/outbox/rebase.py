"""Re-basing the relay's fence after etcd lost its data: the checks first, then one update.

A relay term's fencing token is its leader key's etcd revision. When etcd's data is wiped
(or a service is pointed at another etcd), revisions start again at 1 while Postgres's
``fencing_tokens`` keeps the highest token it accepted: every new term is refused, for good.
Re-basing sets the stored token down to the current etcd's relay term (or its revision when
nobody leads), so the next term is let in and every older term of the new etcd stays out.

It is refused unless all of these hold:

* etcd's revision is below the stored token (else etcd did not go backwards: nothing to fix);
* the stored token was last accepted ``quiet`` seconds ago or more (a relay of the old etcd
  still publishing would keep refreshing it);
* the stored token is still the one the operator saw (``expected``), checked and changed in
  one transaction that holds the fence's row, so no fenced write slips in between.

What it cannot see is a relay on another etcd that stays idle: the operator confirms that
every instance now uses this etcd (``confirm_etcd_reset``).

>>> site = RelayFence(service="order", resource="outbox-relay/order",
...                   election="/ordermesh/elections/outbox-relay/order",
...                   etcd_url="http://127.0.0.1:2379")
>>> view = await read_fence(db, site)      # stored token, etcd revision, leader's token
>>> done = await rebase(db, site, expected=view.stored_token, quiet=6.0)
"""

from __future__ import annotations

from dataclasses import dataclass

from ordermesh_shared.coordination.fencing import FenceRecord, fence_record, rebase_fence
from ordermesh_shared.database import Database
from ordermesh_shared.etcd_client import EtcdClient, EtcdError


class RebaseRefused(Exception):
    """The fence was left as it is; the message says why and what would change that."""


@dataclass(frozen=True, slots=True)
class RelayFence:
    """Where one service's relay fence lives: its Postgres row and its etcd election."""

    service: str
    resource: str
    election: str
    etcd_url: str


@dataclass(frozen=True, slots=True)
class EtcdView:
    """etcd as the relay election sees it now."""

    revision: int
    leader: str | None = None
    leader_token: int | None = None  # the leading term's token (its key's create revision)

    @property
    def rebase_to(self) -> int:
        """The token a re-base stores: the leading term's, else any later term's floor."""
        return self.leader_token if self.leader_token is not None else self.revision


@dataclass(frozen=True, slots=True)
class FenceView:
    """The fence next to etcd: whether etcd's revisions fell behind it."""

    stored_token: int | None
    idle_seconds: float | None  # since a write with the stored token was last accepted
    etcd: EtcdView

    @property
    def etcd_behind(self) -> bool:
        """True when etcd's revision is below the stored token: no new term can get in."""
        return self.stored_token is not None and self.etcd.revision < self.stored_token


async def read_etcd(site: RelayFence) -> EtcdView:
    """The election's keys and etcd's revision, in one read (raises RebaseRefused if down)."""
    try:
        async with EtcdClient(site.etcd_url) as etcd:
            keys, revision = await etcd.get_prefix(site.election.rstrip("/") + "/")
    except EtcdError as exc:
        raise RebaseRefused(f"etcd at {site.etcd_url} does not answer: {exc}") from exc
    if not keys:
        return EtcdView(revision)
    first = min(keys, key=lambda kv: kv.create_revision)  # etcd's rule: the oldest key leads
    return EtcdView(revision, first.value.decode("utf-8", "replace"), first.create_revision)


async def read_fence(db: Database, site: RelayFence) -> FenceView:
    """The stored token and how long ago it was accepted, beside etcd's view."""
    etcd = await read_etcd(site)
    async with db.pool.acquire() as conn, conn.transaction():
        record = await fence_record(conn, resource=site.resource)
    return _view(record, etcd)


async def rebase(
    db: Database, site: RelayFence, *, expected: int | None, quiet: float
) -> FenceView:
    """Set the fence to the current etcd's relay term; returns the view it acted on (its
    ``stored_token`` is the one replaced). Raises :class:`RebaseRefused` instead of acting
    when any check fails."""
    etcd = await read_etcd(site)  # first: a term starting after this read gets a higher token
    async with db.pool.acquire() as conn, conn.transaction():
        view = _view(await fence_record(conn, resource=site.resource), etcd)
        _refuse_unless_safe(view, site, expected=expected, quiet=quiet)
        assert view.stored_token is not None
        changed = await rebase_fence(
            conn, resource=site.resource, token=etcd.rebase_to, expected=view.stored_token
        )
        if not changed:  # the row is locked by us: cannot happen, but never claim success
            raise RebaseRefused("the stored token changed meanwhile: look again")
    return view


def _view(record: FenceRecord | None, etcd: EtcdView) -> FenceView:
    if record is None:
        return FenceView(None, None, etcd)
    return FenceView(record.token, record.idle_seconds, etcd)


def _refuse_unless_safe(
    view: FenceView, site: RelayFence, *, expected: int | None, quiet: float
) -> None:
    stored, revision = view.stored_token, view.etcd.revision
    if stored is None:
        raise RebaseRefused(f"{site.resource} was never fenced: every relay term is let in")
    if expected is not None and expected != stored:
        raise RebaseRefused(
            f"the stored token is {stored} now, not {expected} as you saw it: look again"
        )
    if not view.etcd_behind:
        raise RebaseRefused(
            f"etcd's revision {revision} is not below the stored token {stored}: etcd did not"
            " lose its data, nothing to fix (a relay refused now is a stale leader, and it"
            " steps down by itself)"
        )
    idle = view.idle_seconds or 0.0
    if idle < quiet:
        raise RebaseRefused(
            f"token {stored} was accepted {idle:.1f} s ago: a relay of the old etcd may still"
            f" be live. Make sure every {site.service} instance uses etcd at {site.etcd_url},"
            f" then try again in {quiet - idle:.0f} s"
        )
