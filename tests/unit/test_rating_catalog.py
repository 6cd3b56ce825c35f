from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from rating.catalog import parse_catalog
from rating.errors import CatalogError, UnknownPlanError
from tests.unit.test_rating_support import CATALOG_YAML, catalog, utc


def test_decimals_keep_their_written_scale() -> None:
    cat = catalog()
    plan = cat.plan_for("starter", utc(2026, 11, 1))
    assert [str(t.rate) for t in plan.overage_tiers] == ["0.0200", "0.0150", "0.0100"]
    assert str(plan.base_fee) == "49.00"
    assert {k: str(v) for k, v in cat.tax_regions.items()} == {
        "US-NY": "0.08875",
        "GB": "0.20",
        "NONE": "0",
        "HALF": "0.5",
    }
    assert str(cat.plan_for("capped", utc(2026, 11, 1)).overage_cap) == "5.00"


@pytest.mark.parametrize(
    ("plan", "at", "base_fee"),
    [
        ("starter", utc(2026, 1, 1), "49.00"),
        ("starter", utc(2026, 11, 30, 23, 59, 59, 999), "49.00"),
        ("starter", utc(2026, 12, 1), "59.00"),
        ("starter", utc(2027, 6, 15), "59.00"),
    ],
)
def test_price_book_is_latest_effective_at_or_before_period_start(
    plan: str, at: datetime, base_fee: str
) -> None:
    assert str(catalog().plan_for(plan, at).base_fee) == base_fee


@pytest.mark.parametrize(
    ("plan", "at"),
    [("starter", utc(2025, 12, 31)), ("capped", utc(2026, 12, 1)), ("nope", utc(2026, 6, 1))],
)
def test_plan_for_unknown(plan: str, at: datetime) -> None:
    with pytest.raises(UnknownPlanError):
        catalog().plan_for(plan, at)


def test_has_plan_and_tax_rate() -> None:
    cat = catalog()
    assert cat.has_plan("capped") and not cat.has_plan("nope")
    assert cat.tax_rate("GB") == Decimal("0.20")
    with pytest.raises(CatalogError):
        cat.tax_rate("XX")


def test_price_books_need_not_be_listed_in_order() -> None:
    head, first, second = CATALOG_YAML.split("  - id:")
    cat = parse_catalog(head + "  - id:" + second + "  - id:" + first)
    assert str(cat.plan_for("starter", utc(2026, 11, 1)).base_fee) == "49.00"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('base_fee: "49.00"', "base_fee: 49.00", "quoted strings"),
        ('base_fee: "49.00"', 'base_fee: "abc"', "not a decimal"),
        ('base_fee: "49.00"', 'base_fee: "-1"', "greater than or equal"),
        ('- {up_to: null, rate: "0.0100"}', '- {up_to: 400, rate: "0.0100"}', "up_to: null"),
        ("- {up_to: 300, rate", "- {up_to: 50, rate", "ascending"),
        ("- {up_to: 300, rate", "- {up_to: null, rate", "only the last"),
        ("overage: block", "overage: maybe", "charge"),
        ("increment_seconds: 6", "increment_seconds: 0", "greater than or equal to 1"),
        ('effective_from: "2026-12-01T00:00:00Z"', 'effective_from: "2026-12-01T00:00:00"', "timezone"),
        ('effective_from: "2026-12-01T00:00:00Z"', 'effective_from: "2026-01-01T00:00:00Z"', "ambiguous"),
        ("employees: {max_active: 2}", "employees: {max_active: 2, extra: 1}", "Extra inputs"),
        ("revision: 3", "revision: [3", "not valid YAML"),
    ],
)
def test_invalid_catalogs(old: str, new: str, message: str) -> None:
    assert old in CATALOG_YAML
    with pytest.raises(CatalogError, match=message) as info:
        parse_catalog(CATALOG_YAML.replace(old, new, 1))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["", "just text", "- 1\n- 2\n"])
def test_catalog_must_be_a_mapping(text: str) -> None:
    with pytest.raises(CatalogError, match="mapping"):
        parse_catalog(text)


def test_effective_from_in_other_zone_is_normalised() -> None:
    text = CATALOG_YAML.replace('"2026-12-01T00:00:00Z"', '"2026-12-01T01:00:00+01:00"')
    assert str(parse_catalog(text).plan_for("starter", utc(2026, 12, 1)).base_fee) == "59.00"
