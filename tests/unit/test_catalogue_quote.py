"""Quoting from the catalogue replica and comparing with what inventory took: plain Python."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from order.catalogue import fact_of, newest_per_sku
from order.domain import Line, PriceChange, ProductFact, price_changes, quote
from ordermesh_shared.errors import Rejected

KB = ProductFact("KB-101", "Mechanical keyboard", Decimal("89.00"), 500, version=3)
MS = ProductFact("MS-202", "Wireless mouse", Decimal("25.50"), 2000, version=1)
CATALOGUE = {KB.sku: KB, MS.sku: MS}


def test_a_filled_replica_quotes_each_line_at_its_price() -> None:
    quoted = quote([Line("KB-101", 2), Line("MS-202", 1)], CATALOGUE, filled=True)
    assert quoted.prices == {"KB-101": Decimal("89.00"), "MS-202": Decimal("25.50")}


def test_a_filled_replica_refuses_unknown_skus_naming_them() -> None:
    with pytest.raises(Rejected, match=r"unknown SKU\(s\): NOPE-1, ZZ-9") as refused:
        quote([Line("ZZ-9", 1), Line("KB-101", 1), Line("NOPE-1", 1)], CATALOGUE, filled=True)
    assert refused.value.status_code == 422
    assert refused.value.reason == "unknown_sku"


def test_a_cold_replica_lets_unknown_skus_through_unquoted() -> None:
    quoted = quote([Line("NEW-1", 1), Line("KB-101", 1)], CATALOGUE, filled=False)
    assert quoted.price_of("NEW-1") is None
    assert quoted.price_of("KB-101") == Decimal("89.00")


def test_price_changes_are_the_quoted_lines_taken_at_another_price() -> None:
    quoted = {"KB-101": Decimal("89.00"), "MS-202": Decimal("25.50"), "NEW-1": None}
    taken = {"KB-101": Decimal("95.00"), "MS-202": Decimal("25.50"), "NEW-1": Decimal("5.00")}
    changes = price_changes(quoted, taken)
    assert changes == [PriceChange("KB-101", Decimal("89.00"), Decimal("95.00"))]
    assert changes[0].difference == Decimal("6.00")


def test_nothing_to_compare_before_stock_is_reserved() -> None:
    assert price_changes({"KB-101": Decimal("89.00")}, {"KB-101": None}) == []


def test_a_batch_keeps_the_newest_version_of_each_sku() -> None:
    older = ProductFact("KB-101", "Mechanical keyboard", Decimal("80.00"), 501, version=2)
    newest = newest_per_sku([KB, MS, older])
    assert newest == [KB, MS]


def test_facts_read_from_an_event_payload() -> None:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    data = {"sku": "KB-101", "name": "Mechanical keyboard", "price": "89.00", "available": 500}
    fact = fact_of({**data, "version": 3}, at)
    assert fact == ProductFact("KB-101", "Mechanical keyboard", Decimal("89.00"), 500, 3, at)
