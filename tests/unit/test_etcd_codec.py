"""The etcd gateway codec: base64, int64-as-string, omitted zero fields, error shapes.

Payloads are copied from etcd 3.4.23's gateway; no network is used.
"""

from __future__ import annotations

import httpx
import pytest
from ordermesh_shared.discovery.base import ServiceInstance
from ordermesh_shared.discovery.etcd import decode_instance, encode_instance
from ordermesh_shared.etcd_client import (
    Compare,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    EventType,
    KeyValue,
    LeaseNotFound,
    NotLeader,
    WatchCompacted,
    decode_key,
    decode_kv,
    encode,
    encode_compare,
    error_from_answer,
    keepalive_ttl,
    prefix_range_end,
    watch_batch,
)

HEADER = {"cluster_id": "324952591200643719", "member_id": "3319814642761637952", "revision": "6"}


@pytest.mark.parametrize(
    ("prefix", "end"),
    [("/a/", b"/a0"), (b"ab\xff", b"ac"), (b"\xff\xff", b"\x00"), ("", b"\x00")],
)
def test_prefix_range_end_covers_exactly_the_prefix(prefix: str | bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


def test_keys_round_trip_even_when_not_utf8() -> None:
    assert decode_key(encode("/ordermesh/services/π")) == "/ordermesh/services/π"
    odd = b"\xfe\x00k".decode("utf-8", "surrogateescape")
    assert decode_key(encode(odd.encode("utf-8", "surrogateescape"))) == odd


def test_kv_decodes_base64_and_int64_strings() -> None:
    raw = {
        "key": "L3AveA==",
        "create_revision": "4",
        "mod_revision": "5",
        "version": "2",
        "value": "dg==",
        "lease": "2324035632757171478",
    }

    assert decode_kv(raw) == KeyValue("/p/x", b"v", 4, 5, 2, 2324035632757171478)


def test_kv_omitted_fields_mean_zero_or_empty() -> None:
    # An empty value and no lease: the gateway leaves both fields out.
    assert decode_kv({"key": "L3AveA==", "mod_revision": "6"}) == KeyValue("/p/x", b"", 0, 6)


def test_watch_created_header_carries_no_events() -> None:
    assert watch_batch({"header": HEADER, "created": True}) is None


def test_watch_events_default_to_put_and_name_delete() -> None:
    result = {
        "header": HEADER,
        "events": [
            {"kv": {"key": "L3AveA==", "mod_revision": "5", "value": "dg=="}},
            {"type": "DELETE", "kv": {"key": "L3AveA==", "mod_revision": "6"}},
        ],
    }

    batch = watch_batch(result)

    assert batch is not None
    assert batch.revision == 6
    assert [(e.type, e.kv.value) for e in batch.events] == [
        (EventType.PUT, b"v"),
        (EventType.DELETE, b""),
    ]


def test_watch_on_compacted_revision_raises_watch_compacted() -> None:
    result = {"header": HEADER, "canceled": True, "compact_revision": "5"}

    with pytest.raises(WatchCompacted) as raised:
        watch_batch(result)

    assert raised.value.compact_revision == 5


def test_watch_cancelled_for_another_reason_raises_etcd_error() -> None:
    with pytest.raises(EtcdError, match="permission denied"):
        watch_batch({"header": HEADER, "canceled": True, "cancel_reason": "permission denied"})


def test_keepalive_of_expired_lease_has_no_ttl() -> None:
    assert keepalive_ttl(1, {"header": HEADER, "ID": "12345", "TTL": "3"}) == 3
    with pytest.raises(LeaseNotFound):
        keepalive_ttl(12345, {"header": HEADER, "ID": "12345"})


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (
            {"error": "x", "message": "etcdserver: requested lease not found", "code": 5},
            LeaseNotFound,
        ),
        (
            {"error": "x", "message": "etcdserver: requested lease not found", "code": 2},
            LeaseNotFound,
        ),
        ({"error": "x", "message": "election: not leader", "code": 2}, NotLeader),
        ({"error": {"grpc_code": 14, "message": "etcdserver: no leader"}}, EtcdUnavailable),
        ({"error": "x", "message": "etcdserver: request timed out", "code": 4}, EtcdUnavailable),
        ({"error": "x", "message": "etcdserver: key is not provided", "code": 3}, EtcdError),
    ],
)
def test_gateway_errors_map_to_the_hierarchy(answer: dict[str, object], error: type) -> None:
    raised = error_from_answer("/v3/x", answer)

    assert type(raised) is error
    assert "/v3/x" in str(raised)


def test_compare_uses_the_field_matching_its_target() -> None:
    assert encode_compare(Compare("k", "CREATE", "=", 0)) == {
        "key": "aw==",
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": "0",
    }


def test_service_instance_round_trips_through_its_stored_form() -> None:
    instance = ServiceInstance("payment", "payment-1", "10.0.0.7", 8002, {"zone": "b"})

    decoded = decode_instance(encode_instance(instance))

    assert (decoded, decoded.meta) == (instance, {"zone": "b"})


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"service": "payment"}', b'{"port": "x"}'])
def test_malformed_stored_instance_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a service instance"):
        decode_instance(raw)


async def test_transport_failures_never_leak_httpx_exceptions() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    async with EtcdClient("http://etcd.test:2379", transport=httpx.MockTransport(broken)) as etcd:
        with pytest.raises(EtcdUnavailable, match=r"etcd\.test:2379"):
            await etcd.get("k")


async def test_non_json_answer_is_an_etcd_error() -> None:
    def proxy_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    async with EtcdClient("http://etcd.test", transport=httpx.MockTransport(proxy_page)) as etcd:
        with pytest.raises(EtcdError, match="non-JSON"):
            await etcd.put("k", "v")
