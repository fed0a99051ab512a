"""Bad input to locks, elections and fencing fails at once, with a message saying what is wrong."""

from __future__ import annotations

from typing import Any, cast

import pytest
from ordermesh_shared.coordination import Election, Lock, fence
from ordermesh_shared.database import DbConn
from ordermesh_shared.etcd_client import EtcdClient

# Never contacted: every check here fails before any I/O.
NOWHERE = EtcdClient("http://127.0.0.1:9")


class OutsideTransaction:
    """A connection with no transaction open (all fence() looks at before refusing)."""

    def is_in_transaction(self) -> bool:
        return False


@pytest.mark.parametrize("name", ["", "   ", None, 42])
def test_lock_refuses_empty_or_non_string_name(name: Any) -> None:
    with pytest.raises(ValueError, match="lock name must be a non-empty string"):
        Lock(NOWHERE, name, ttl=1.0)


@pytest.mark.parametrize("ttl", [0, -1.5, float("nan"), True, "2"])
def test_lock_refuses_ttl_that_is_not_positive_seconds(ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl must be a positive number of seconds"):
        Lock(NOWHERE, "jobs", ttl=ttl)


async def test_hold_refuses_negative_timeout() -> None:
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        async with Lock(NOWHERE, "jobs", ttl=1.0).hold(timeout=-1):
            pass


@pytest.mark.parametrize("name", ["", "\t"])
def test_election_refuses_empty_name(name: str) -> None:
    with pytest.raises(ValueError, match="election name must be a non-empty string"):
        Election(NOWHERE, name, ttl=1.0, value="me")


def test_election_refuses_zero_ttl() -> None:
    with pytest.raises(ValueError, match="ttl must be a positive number"):
        Election(NOWHERE, "relay", ttl=0, value="me")


def test_election_refuses_non_string_value() -> None:
    with pytest.raises(ValueError, match="value must be a string"):
        Election(NOWHERE, "relay", ttl=1.0, value=cast(str, b"me"))


def test_ttl_error_mentions_etcd_rounding() -> None:
    with pytest.raises(ValueError, match="rounds it up to whole seconds"):
        Lock(NOWHERE, "jobs", ttl=-1)


@pytest.mark.parametrize("resource", ["", "  ", None])
async def test_fence_refuses_empty_resource(resource: Any) -> None:
    with pytest.raises(ValueError, match="resource must be a non-empty string"):
        await fence(cast(DbConn, OutsideTransaction()), resource=resource, token=3)


@pytest.mark.parametrize("token", [0, -4, True, 2.0, "7", None])
async def test_fence_refuses_token_that_is_not_a_revision(token: Any) -> None:
    with pytest.raises(ValueError, match="token must be a positive int"):
        await fence(cast(DbConn, OutsideTransaction()), resource="ledger", token=token)


async def test_fence_refuses_to_run_outside_a_transaction() -> None:
    with pytest.raises(RuntimeError, match="inside the transaction of the write"):
        await fence(cast(DbConn, OutsideTransaction()), resource="ledger", token=3)
