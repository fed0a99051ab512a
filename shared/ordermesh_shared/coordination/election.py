"""Leader election over etcd's ``/v3/election`` API, stepping down before the lease lapses."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import NoReturn

import structlog

from ordermesh_shared.coordination.errors import CampaignTimeout
from ordermesh_shared.coordination.lease import (
    LEASE_ATTEMPTS,
    Backoff,
    LeaseKeeper,
    LeaseLapsed,
    check_name,
    check_ttl,
    guarded,
    release_quietly,
    time_left,
    unless_lost,
)
from ordermesh_shared.coordination.term import Term, Work, run_terms
from ordermesh_shared.etcd_client import EtcdClient, EtcdError, KeyValue, LeaderKey, WaitTimeout

log = structlog.get_logger(__name__)

_OBSERVE_REFRESH = 30.0  # seconds without news after which observe() reconnects


class Election:
    """One contender in a named etcd election; satisfies :class:`LeaderElection`.

    >>> election = Election(etcd, "/ordermesh/elections/relay", ttl=5.0, value=instance_id)
    >>> await election.run_while_leader(relay)  # relay(term) runs only while this one leads
    >>> async with election.lead() as term: ...  # or one term by hand: term.token, term.lost

    Leadership lives as long as the contender's lease, renewed every TTL/4. When renewals
    stop being confirmed, ``term.lost`` is set after 0.6 x TTL, leaving the leader the rest
    of the TTL to stop before anyone else can be elected. Use ``term.token`` to fence writes.
    One ``Election`` object campaigns for one term at a time.
    """

    def __init__(self, client: EtcdClient, name: str, *, ttl: float, value: str) -> None:
        self.name = check_name(name, what="election")
        self.ttl = check_ttl(ttl)
        if not isinstance(value, str):
            raise ValueError(f"value must be a string naming this contender, got {value!r}")
        self.value = value
        self._client = client
        self._campaigning = False
        self._term: Term | None = None
        self._leader_key: LeaderKey | None = None

    @property
    def is_leader(self) -> bool:
        """True while this contender is in a term that is not (possibly) lost."""
        return self._term is not None and not self._term.lost.is_set()

    @asynccontextmanager
    async def lead(self, timeout: float | None = None) -> AsyncIterator[Term]:  # noqa: ASYNC109
        """Campaign until elected (or :class:`CampaignTimeout`), lead for the block, resign."""
        if self._campaigning:
            raise RuntimeError(f"this Election for {self.name!r} already campaigns or leads")
        self._campaigning = True
        try:
            async with self._campaign_with_fresh_leases(timeout) as term:
                yield term
        finally:
            self._campaigning = False

    async def leader(self) -> str | None:
        """The current leader's value, or None if nobody leads."""
        kv = await guarded(self._client.leader(self.name), what=self._what)
        return None if kv is None else _value(kv)

    async def observe(self) -> AsyncIterator[str]:
        """Yield the leader's value now (once there is a leader) and at every change of leader.

        Reconnects with backoff when etcd goes away; stop by breaking out or cancelling.
        """
        backoff, last = Backoff(), (0, 0)
        while True:
            # Reconnecting now and then (idle_timeout) also detects an etcd that froze.
            changes = self._client.observe(self.name, idle_timeout=_OBSERVE_REFRESH)
            try:
                async with contextlib.aclosing(changes):
                    async for kv in changes:
                        backoff.reset()
                        if (kv.create_revision, kv.mod_revision) != last:
                            last = (kv.create_revision, kv.mod_revision)
                            yield _value(kv)
            except WaitTimeout:
                continue  # quiet is normal: nobody changed; reconnect at once
            except EtcdError as exc:
                log.warning("election.observe_broken", election=self.name, error=str(exc))
            await backoff.sleep()

    async def resign(self) -> None:
        """Step down now, so the next contender is elected at once; ends the current term."""
        key, term = self._leader_key, self._term
        if key is None or term is None:
            return
        await guarded(self._client.resign(key), what=self._what)
        self._leader_key = None
        term.lost.set()  # after the etcd call: work calling resign() is cancelled only now
        log.info("election.resigned", election=self.name, token=term.token)

    async def run_while_leader(self, work: Work) -> NoReturn:
        """Forever: campaign, run ``work(term)`` while leading, step down, campaign again.

        Work is cancelled when the term may be lost (before the lease can expire) and
        re-run after a backoff if it returns or raises; etcd outages are waited out with
        backoff. Cancel the task running this to stop (it resigns on the way out).
        """
        await run_terms(self.lead, work, what=self._what)

    @property
    def _what(self) -> str:
        return f"election {self.name!r}"

    @asynccontextmanager
    async def _campaign_with_fresh_leases(self, wait: float | None) -> AsyncIterator[Term]:
        deadline = None if wait is None else time.monotonic() + wait
        for attempt in range(1, LEASE_ATTEMPTS + 1):
            async with LeaseKeeper(self._client, ttl=self.ttl, what=self._what) as keeper:
                request = guarded(
                    self._campaign(keeper.lease, time_left(deadline), wait), what=self._what
                )
                try:
                    key = await unless_lost(request, keeper, what=self._what)
                except LeaseLapsed as exc:  # not elected yet: safe to start over
                    if attempt == LEASE_ATTEMPTS:
                        raise
                    log.warning(
                        "election.lease_lapsed_while_waiting", election=self.name, error=str(exc)
                    )
                    continue
                async with self._term_of(keeper, key) as term:
                    yield term
                return

    @asynccontextmanager
    async def _term_of(self, keeper: LeaseKeeper, key: LeaderKey) -> AsyncIterator[Term]:
        term = Term(self.name, self.value, key.rev, datetime.now(UTC), keeper.lost)
        self._term, self._leader_key = term, key
        log.info("election.elected", election=self.name, value=self.value, token=term.token)
        try:
            yield term
        finally:
            self._term = None
            # Once the lease is lost, revoking it (on leaving) deletes the leader key anyway.
            if self._leader_key is not None and not keeper.lost.is_set():
                await release_quietly(self._client.resign(key), what=f"{self._what}: resign")
            self._leader_key = None
            log.info("election.stepped_down", election=self.name, token=term.token)

    async def _campaign(self, lease: int, left: float | None, wait: float | None) -> LeaderKey:
        try:
            return await self._client.campaign(
                self.name, lease=lease, value=self.value, timeout=left
            )
        except WaitTimeout:
            raise CampaignTimeout(
                f"not elected leader of {self.name!r} within {wait} s: someone else leads"
            ) from None


def _value(kv: KeyValue) -> str:
    return kv.value.decode("utf-8", "replace")
