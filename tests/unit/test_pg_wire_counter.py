"""The wire counter reads a PostgreSQL client's messages as asyncpg sends them and counts
each round trip once, whatever the bytes' slicing (hand-built messages, no server)."""

from __future__ import annotations

import struct

from tests.support.pg_proxy import RoundTrip, WireCounter

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def startup(user: str = "ordermesh") -> bytes:
    body = struct.pack("!i", PROTOCOL_3) + b"user\x00" + user.encode() + b"\x00\x00"
    return struct.pack("!i", len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST)


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\x00")


def parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", 0))


def describe(name: str) -> bytes:
    return message(b"D", b"S" + name.encode() + b"\x00")


def bind(statement: str) -> bytes:
    # Portal "", the statement, no parameter formats, no parameters, no result formats.
    return message(b"B", b"\x00" + statement.encode() + b"\x00" + struct.pack("!hhh", 0, 0, 0))


def execute() -> bytes:
    return message(b"E", b"\x00" + struct.pack("!i", 0))


SYNC = message(b"S")
FLUSH = message(b"H")
SELECT_ORDER = "SELECT * FROM orders WHERE id = $1"
# asyncpg on a statement-cache miss: prepare (Parse/Describe/Flush), then run it.
PREPARE = parse("__asyncpg_stmt_1__", SELECT_ORDER) + describe("__asyncpg_stmt_1__") + FLUSH
RUN_CACHED = bind("__asyncpg_stmt_1__") + execute() + SYNC


def counted(*chunks: bytes) -> tuple[list[RoundTrip], WireCounter]:
    trips: list[RoundTrip] = []
    counter = WireCounter(trips.append)
    for chunk in chunks:
        counter.feed(chunk)
    return trips, counter


def test_a_simple_query_is_one_round_trip_with_its_sql() -> None:
    trips, _ = counted(startup(), query("BEGIN;"), query("COMMIT;"))
    assert trips == [RoundTrip("query", "BEGIN;"), RoundTrip("query", "COMMIT;")]


def test_the_startup_packet_is_not_a_round_trip_nor_mistaken_for_a_message() -> None:
    # Its length's first byte is 0 and its body holds an "S" and a "Q": not read as typed.
    trips, _ = counted(startup("SQ"))
    assert trips == []


def test_an_ssl_request_before_the_startup_packet_is_skipped() -> None:
    trips, _ = counted(ssl_request(), startup(), query("SELECT 1"))
    assert trips == [RoundTrip("query", "SELECT 1")]


def test_a_cache_miss_is_two_round_trips_and_a_hit_one() -> None:
    trips, _ = counted(startup(), PREPARE, RUN_CACHED, RUN_CACHED)
    assert trips == [
        RoundTrip("prepare", SELECT_ORDER),
        RoundTrip("execute", SELECT_ORDER),  # the name found through the Parse that made it
        RoundTrip("execute", SELECT_ORDER),
    ]


def test_parse_bind_execute_sync_in_one_batch_is_one_round_trip() -> None:
    batch = parse("", "UPDATE stock SET n = n - 1") + bind("") + execute() + SYNC
    trips, _ = counted(startup(), batch)
    assert trips == [RoundTrip("execute", "UPDATE stock SET n = n - 1")]


def test_executemany_pipelined_in_one_sync_is_one_round_trip() -> None:
    many = bind("__asyncpg_stmt_1__") + execute()
    trips, _ = counted(startup(), PREPARE, many * 3 + SYNC)
    assert trips == [RoundTrip("prepare", SELECT_ORDER), RoundTrip("execute", SELECT_ORDER)]


def test_any_slicing_of_the_bytes_counts_the_same() -> None:
    wire = ssl_request() + startup() + query("BEGIN;") + PREPARE + RUN_CACHED + query("COMMIT;")
    whole, _ = counted(wire)
    one_by_one, _ = counted(*(wire[i : i + 1] for i in range(len(wire))))
    assert len(whole) == 4
    assert one_by_one == whole


def test_close_sync_and_a_bare_sync_are_round_trips_a_bare_flush_is_not() -> None:
    close = message(b"C", b"S__asyncpg_stmt_1__\x00")
    trips, _ = counted(startup(), FLUSH, close + SYNC, SYNC)
    assert trips == [RoundTrip("other", ""), RoundTrip("other", "")]


def test_authentication_messages_are_counted_apart() -> None:
    password = message(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", 4) + b"nonc")
    trips, counter = counted(startup(), password, message(b"p", b"proof"), query("SELECT 1"))
    assert counter.auth_messages == 2
    assert trips == [RoundTrip("query", "SELECT 1")]


def test_an_unknown_statement_is_named_not_guessed() -> None:
    trips, _ = counted(startup(), RUN_CACHED)
    assert trips == [RoundTrip("execute", "<statement '__asyncpg_stmt_1__'>")]
