"""Customer credit (rating/credit.py): a correction that lowers a final invoice is a credit taxed at that
invoice's rate, held as a balance that later invoices apply to their totals (docs/decisions.md)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from rating.credit import Credit, customer_credit
from rating.errors import RatingError
from tests.unit.test_rating_invoice import invoice

D = Decimal


def credit(amount: str, rate: str, corrects: str = "t1-20261001") -> Credit:
    return Credit(corrects, f"Correction of invoice {corrects}", D(amount), D(rate))


@pytest.mark.parametrize(
    ("amount", "rate", "tax", "total"),
    [
        ("-227.17", "0.08875", "-20.16", "-247.33"),  # 20.1613375
        ("-10.01", "0.08875", "-0.89", "-10.90"),  # 0.8883875
        ("-0.05", "0.5", "-0.03", "-0.08"),  # 0.025: half up, away from zero
        ("-0.01", "0.20", "0.00", "-0.01"),  # 0.002
        ("-40.00", "0.20", "-8.00", "-48.00"),
        ("-1.00", "0", "0.00", "-1.00"),
    ],
)
def test_a_credit_is_taxed_at_the_rate_of_the_invoice_it_corrects(
    amount: str, rate: str, tax: str, total: str
) -> None:
    c = credit(amount, rate)
    assert (c.tax, c.total) == (D(tax), D(total))
    assert c.to_json_dict() == {
        "code": "credit",
        "description": "Correction of invoice t1-20261001",
        "corrects_invoice": "t1-20261001",
        "amount": amount,
        "tax_rate": rate,
        "tax": tax,
        "total": total,
    }


@pytest.mark.parametrize(
    ("amount", "rate"), [("0.00", "0.20"), ("3.00", "0.20"), ("-0.005", "0.20"), ("-1.00", "-0.1")]
)
def test_a_credit_is_a_negative_amount_in_cents_at_a_real_rate(amount: str, rate: str) -> None:
    with pytest.raises(RatingError):
        credit(amount, rate)


@pytest.mark.parametrize(
    ("total", "before", "credits", "granted", "applied", "after", "due"),
    [
        # December's own charges 49.00 + 4.35 tax, and a price fix finding November overcharged by 227.17
        # before tax. As a negative line that was subtotal -178.17, total -193.98; as a credit, nothing
        # is due and 193.98 is carried.
        ("53.35", "0.00", [("-227.17", "0.08875")], "247.33", "53.35", "193.98", "0.00"),
        # The next month uses the balance carried.
        ("53.35", "193.98", [], "0.00", "53.35", "140.63", "0.00"),
        # A balance smaller than the total: used up, the rest is due.
        ("53.35", "10.00", [], "0.00", "10.00", "0.00", "43.35"),
        ("53.35", "53.35", [], "0.00", "53.35", "0.00", "0.00"),
        # An invoice of nothing uses nothing; nothing is ever paid out.
        ("0.00", "5.00", [], "0.00", "0.00", "5.00", "0.00"),
        # Two corrected invoices at their own rates, and a balance: 12.00 + 5.44 + 1.00 = 18.44.
        ("58.80", "1.00", [("-10.00", "0.20"), ("-5.00", "0.08875")], "17.44", "18.44", "0.00", "40.36"),
        # No credit at all: what is due is the total.
        ("75.69", "0.00", [], "0.00", "0.00", "0.00", "75.69"),
    ],
)
def test_customer_credit_applies_to_the_total_and_carries_the_rest(
    total: str,
    before: str,
    credits: list[tuple[str, str]],
    granted: str,
    applied: str,
    after: str,
    due: str,
) -> None:
    used = customer_credit(D(total), D(before), [credit(a, r) for a, r in credits])
    assert (used.balance_before, used.granted, used.applied, used.balance_after, used.amount_due) == (
        D(before),
        D(granted),
        D(applied),
        D(after),
        D(due),
    )
    assert used.balance_before + used.granted == used.applied + used.balance_after


def test_a_credit_balance_is_never_negative() -> None:
    with pytest.raises(RatingError):
        customer_credit(D("53.35"), D("-0.01"), [])


def test_an_invoice_with_a_credit_keeps_its_own_charges_and_tax() -> None:
    """The credit does not enter December's subtotal, tax or total (the same figures as above)."""
    built = invoice("starter", 0, region="US-NY")
    with_credit = replace(built, credits=(credit("-227.17", "0.08875", "t1-20261001"),))
    body = with_credit.to_json_dict("2027-01-02T00:00:00Z")
    assert (body["subtotal"], body["tax_rate"], body["tax"], body["total"]) == (
        "49.00",
        "0.08875",
        "4.35",
        "53.35",
    )
    assert [line["code"] for line in body["lines"]] == ["base_fee", "included_seconds", "employees_peak"]
    assert body["credits"] == [
        {
            "code": "credit",
            "description": "Correction of invoice t1-20261001",
            "corrects_invoice": "t1-20261001",
            "amount": "-227.17",
            "tax_rate": "0.08875",
            "tax": "-20.16",
            "total": "-247.33",
        }
    ]
    assert body["customer_credit"] == {
        "balance_before": "0.00",
        "granted": "247.33",
        "applied": "53.35",
        "balance_after": "193.98",
    }
    assert body["amount_due"] == "0.00"
    assert with_credit.amount_due == D("0.00")
    assert list(body)[-5:] == ["total", "credits", "customer_credit", "amount_due", "generated_at"]


def test_a_credit_keeps_the_corrected_invoices_rate_on_an_invoice_taxed_at_another() -> None:
    # The tenant moved from New York (0.08875) to the UK (0.20) between the two invoices.
    built = replace(invoice("starter", 0, region="GB"), credits=(credit("-10.01", "0.08875"),))
    body = built.to_json_dict("now")
    assert (body["tax_rate"], body["tax"], body["total"]) == ("0.20", "9.80", "58.80")
    assert (body["credits"][0]["tax"], body["credits"][0]["total"]) == ("-0.89", "-10.90")
    assert body["customer_credit"]["applied"] == "10.90"
    assert body["amount_due"] == "47.90"


def test_a_balance_alone_is_shown_and_applied() -> None:
    body = replace(invoice("starter", 0, region="US-NY"), credit_balance_before=D("193.98")).to_json_dict(
        "now"
    )
    assert body["credits"] == []
    assert body["customer_credit"] == {
        "balance_before": "193.98",
        "granted": "0.00",
        "applied": "53.35",
        "balance_after": "140.63",
    }
    assert body["amount_due"] == "0.00"


def test_an_invoice_without_credit_has_the_specs_shape() -> None:
    body = invoice("starter", 0, region="US-NY").to_json_dict("now")
    assert not {"credits", "customer_credit", "amount_due"} & set(body)
    assert invoice("starter", 0, region="US-NY").amount_due == D("53.35")
