from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from rating.errors import NoSubscriptionError, RatingError
from rating.invoice import Invoice, InvoiceLine, build_invoice
from rating.models import ProvisioningEvent
from rating.periods import Period, period_starting_in
from rating.subscription import TenantTimeline
from tests.unit.test_rating_support import catalog, employee, number, prov, start, utc

NOV = period_starting_in(1, 2026, 11)


def invoice(
    plan: str,
    seconds: int,
    *events: ProvisioningEvent,
    region: str = "NONE",
    period: Period = NOV,
    extra: tuple[InvoiceLine, ...] = (),
) -> Invoice:
    timeline = TenantTimeline.from_events("t1", [start(utc(2026, 10, 1, 9), plan, region), *events])
    return build_invoice(
        tenant_id="t1",
        period=period,
        timeline=timeline,
        catalog=catalog(),
        billable_seconds_total=seconds,
        extra_lines=extra,
    )


def usage(inv: Invoice) -> list[tuple[str, str, str, str]]:
    keep = {"included_seconds", "overage_seconds", "overage_cap", "blocked_overage_seconds"}
    return [
        (line.code, line.quantity, line.unit_price, line.to_json_dict()["amount"])
        for line in inv.lines
        if line.code in keep
    ]


INC = "included_seconds"
OVER = "overage_seconds"


@pytest.mark.parametrize(
    ("plan", "seconds", "expected", "subtotal"),
    [
        ("starter", 0, [(INC, "0", "0", "0.00")], "49.00"),
        ("starter", 999, [(INC, "999", "0", "0.00")], "49.00"),
        ("starter", 1000, [(INC, "1000", "0", "0.00")], "49.00"),
        ("starter", 1050, [(INC, "1000", "0", "0.00"), (OVER, "50", "0.0200", "1.00")], "50.00"),
        ("starter", 1100, [(INC, "1000", "0", "0.00"), (OVER, "100", "0.0200", "2.00")], "51.00"),
        # 1 s at 0.0150 = 0.015, rounded half up once on its own line
        (
            "starter",
            1101,
            [(INC, "1000", "0", "0.00"), (OVER, "100", "0.0200", "2.00"), (OVER, "1", "0.0150", "0.02")],
            "51.02",
        ),
        (
            "starter",
            1300,
            [(INC, "1000", "0", "0.00"), (OVER, "100", "0.0200", "2.00"), (OVER, "200", "0.0150", "3.00")],
            "54.00",
        ),
        (
            "starter",
            1333,
            [
                (INC, "1000", "0", "0.00"),
                (OVER, "100", "0.0200", "2.00"),
                (OVER, "200", "0.0150", "3.00"),
                (OVER, "33", "0.0100", "0.33"),
            ],
            "54.33",
        ),
        # the cap: exactly at the cap needs no cap line; above it a negative line brings overage down
        ("capped", 0, [(INC, "0", "0", "0.00")], "10.00"),
        ("capped", 500, [(INC, "0", "0", "0.00"), (OVER, "500", "0.0100", "5.00")], "15.00"),
        (
            "capped",
            501,
            [(INC, "0", "0", "0.00"), (OVER, "501", "0.0100", "5.01"), ("overage_cap", "1", "0", "-0.01")],
            "15.00",
        ),
        (
            "capped",
            6726,
            [(INC, "0", "0", "0.00"), (OVER, "6726", "0.0100", "67.26"), ("overage_cap", "1", "0", "-62.26")],
            "15.00",
        ),
        # block plans: overage reported, never charged
        ("hardstop", 100, [(INC, "100", "0", "0.00")], "19.00"),
        ("hardstop", 120, [(INC, "120", "0", "0.00")], "19.00"),
        (
            "hardstop",
            180,
            [(INC, "120", "0", "0.00"), ("blocked_overage_seconds", "60", "0", "0.00")],
            "19.00",
        ),
    ],
)
def test_usage_lines(
    plan: str, seconds: int, expected: list[tuple[str, str, str, str]], subtotal: str
) -> None:
    inv = invoice(plan, seconds)
    assert usage(inv) == expected
    assert str(inv.subtotal) == subtotal


@pytest.mark.parametrize(
    ("region", "extra_amount", "tax_rate", "tax", "total"),
    [
        ("NONE", "0.00", "0", "0.00", "49.00"),
        ("GB", "0.00", "0.20", "9.80", "58.80"),
        ("US-NY", "0.00", "0.08875", "4.35", "53.35"),  # 4.34875
        ("HALF", "0.01", "0.5", "24.51", "73.52"),  # 24.505: half up, not half even
        ("HALF", "0.05", "0.5", "24.53", "73.58"),  # 24.525
        ("US-NY", "20.52", "0.08875", "6.17", "75.69"),  # 69.52 * 0.08875 = 6.16990
        ("HALF", "-49.01", "0.5", "-0.01", "-0.02"),  # a credit: half up rounds away from zero
    ],
)
def test_tax(region: str, extra_amount: str, tax_rate: str, tax: str, total: str) -> None:
    extra = InvoiceLine("adjustment", "test", "1", extra_amount, Decimal(extra_amount))
    body = invoice("starter", 0, region=region, extra=(extra,)).to_json_dict("now")
    assert (body["tax_rate"], body["tax"], body["total"]) == (tax_rate, tax, total)


def test_json_shape_and_key_order() -> None:
    events = (
        number(utc(2026, 10, 1, 9, 5), "+15551110001"),
        number(utc(2026, 11, 16, 12), "+18005550100", "TOLL_FREE"),
        employee(utc(2026, 10, 2), "a"),
    )
    fix = InvoiceLine("adjustment", "late call", "1", "1.00", Decimal("1.00"), corrects_invoice="t1-20261001")
    body = invoice("starter", 1101, *events, region="US-NY", extra=(fix,)).to_json_dict(
        "2026-12-01T00:00:00Z"
    )
    assert list(body) == [
        "invoice_id",
        "status",
        "tenant_id",
        "plan_id",
        "period_start",
        "period_end",
        "currency",
        "catalog_revision",
        "lines",
        "subtotal",
        "tax_rate",
        "tax",
        "total",
        "generated_at",
    ]
    assert (body["invoice_id"], body["period_start"], body["period_end"]) == (
        "t1-20261101",
        "2026-11-01",
        "2026-12-01",
    )
    assert (body["currency"], body["catalog_revision"], body["generated_at"]) == (
        "USD",
        3,
        "2026-12-01T00:00:00Z",
    )
    assert [line["code"] for line in body["lines"]] == [
        "base_fee",
        "included_seconds",
        "overage_seconds",
        "overage_seconds",
        "number",
        "number",
        "employees_peak",
        "adjustment",
    ]
    assert list(body["lines"][0]) == ["code", "description", "quantity", "unit_price", "amount"]
    assert list(body["lines"][4]) == ["code", "description", "number", "quantity", "unit_price", "amount"]
    assert list(body["lines"][7])[-1] == "corrects_invoice"
    assert body["lines"][0] | {"description": ""} == {
        "code": "base_fee",
        "description": "",
        "quantity": "1",
        "unit_price": "49.00",
        "amount": "49.00",
    }
    assert [(ln["number"], ln["quantity"], ln["amount"]) for ln in body["lines"][4:6]] == [
        ("+15551110001", "1", "0.00"),
        ("+18005550100", "0.5000", "2.50"),
    ]
    assert body["lines"][6]["quantity"] == "1"
    assert all(line["description"] for line in body["lines"])
    # 49.00 + 2.00 + 0.02 + 0.00 + 2.50 + 1.00
    assert (body["subtotal"], body["tax"], body["total"]) == ("54.52", "4.84", "59.36")


def test_price_book_and_plan_change_apply_from_the_period_start() -> None:
    dec = period_starting_in(1, 2026, 12)
    # second price book from December: starter costs 59.00 and overage 0.0300 flat
    inv = invoice("starter", 1010, period=dec)
    assert inv.lines[0].unit_price == "59.00"
    assert usage(inv)[1] == (OVER, "10", "0.0300", "0.30")
    changed = prov("PLAN_CHANGED", utc(2026, 10, 31, 23), plan_id="hardstop")
    assert invoice("starter", 0, changed).plan_id == "hardstop"
    assert invoice("starter", 0, changed, period=period_starting_in(1, 2026, 10)).plan_id == "starter"


def test_no_invoice_for_a_period_after_cancellation() -> None:
    with pytest.raises(NoSubscriptionError):
        invoice("starter", 0, prov("SUBSCRIPTION_CANCELLED", utc(2026, 10, 15)))


@pytest.mark.parametrize(("status", "printed"), [(None, "draft"), ("draft", "draft"), ("final", "final")])
def test_json_says_whether_the_invoice_is_draft_or_final(status: str | None, printed: str) -> None:
    built = invoice("starter", 0)
    if status is not None:
        built = replace(built, status=status)
    body = built.to_json_dict("now")
    assert body["status"] == printed
    # Nothing else depends on it: a final invoice is its draft's figures, declared final.
    assert {k: v for k, v in body.items() if k != "status"} == {
        k: v for k, v in invoice("starter", 0).to_json_dict("now").items() if k != "status"
    }


def test_status_is_draft_or_final_only() -> None:
    with pytest.raises(RatingError, match="status"):
        replace(invoice("starter", 0), status="sent")


def test_amounts_print_two_places() -> None:
    body = invoice("starter", 0).to_json_dict("now")
    assert [line["amount"] for line in body["lines"]] == ["49.00", "0.00", "0.00"]
    assert body["lines"][-1]["code"] == "employees_peak" and body["lines"][-1]["quantity"] == "0"
