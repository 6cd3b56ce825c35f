"""Invoices (spec §7): the lines of one tenant period and their JSON form.

Every line amount is rounded once, to cents, half up; the subtotal sums the rounded amounts, so the
printed lines always add up to the printed subtotal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from rating.catalog import Catalog, Plan
from rating.credit import Credit, CustomerCredit, customer_credit
from rating.errors import NoSubscriptionError, RatingError
from rating.periods import Period
from rating.subscription import TenantTimeline, round_cents

_CENT = Decimal("0.01")
_ZERO = Decimal("0.00")
# A draft is recomputed by every run of the invoice job; a final invoice is issued and never changes.
DRAFT, FINAL = "draft", "final"


def money_text(amount: Decimal) -> str:
    """A money amount as the invoice prints it: exactly two places, no exponent."""
    return format(round_cents(amount), "f")


def decimal_text(value: Decimal) -> str:
    """A catalog decimal exactly as written there (scale kept, never scientific notation)."""
    return format(value, "f")


@dataclass(frozen=True)
class InvoiceLine:
    code: str
    description: str
    quantity: str
    unit_price: str
    amount: Decimal
    number: str | None = None
    # Set on adjustment lines that correct an already issued invoice.
    corrects_invoice: str | None = None
    # Further fields for future line kinds; printed after the standard ones, in insertion order.
    extra: dict[str, str] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "description": self.description}
        if self.number is not None:
            body["number"] = self.number
        body.update(quantity=self.quantity, unit_price=self.unit_price, amount=money_text(self.amount))
        if self.corrects_invoice is not None:
            body["corrects_invoice"] = self.corrects_invoice
        body.update(self.extra)
        return body


@dataclass(frozen=True)
class Invoice:
    invoice_id: str
    tenant_id: str
    plan_id: str
    period: Period
    currency: str
    catalog_revision: int
    lines: list[InvoiceLine]
    subtotal: Decimal
    tax_rate: Decimal
    tax: Decimal
    total: Decimal
    status: str = DRAFT
    # Customer credit (rating/credit.py): corrections that lower earlier final invoices, granted on this
    # one, and the balance the tenant held before it. Neither changes subtotal, tax or total.
    credits: tuple[Credit, ...] = ()
    credit_balance_before: Decimal = _ZERO

    def __post_init__(self) -> None:
        if self.status not in (DRAFT, FINAL):
            msg = f"invoice status must be {DRAFT!r} or {FINAL!r}, got {self.status!r}"
            raise RatingError(msg)

    @property
    def customer_credit(self) -> CustomerCredit:
        return customer_credit(self.total, self.credit_balance_before, self.credits)

    @property
    def amount_due(self) -> Decimal:
        """What the tenant owes for this invoice: its total less the customer credit it applies."""
        return self.customer_credit.amount_due

    def to_json_dict(self, generated_at: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "invoice_id": self.invoice_id,
            "status": self.status,
            "tenant_id": self.tenant_id,
            "plan_id": self.plan_id,
            "period_start": self.period.start_date.isoformat(),
            "period_end": self.period.end_date.isoformat(),
            "currency": self.currency,
            "catalog_revision": self.catalog_revision,
            "lines": [line.to_json_dict() for line in self.lines],
            "subtotal": money_text(self.subtotal),
            "tax_rate": decimal_text(self.tax_rate),
            "tax": money_text(self.tax),
            "total": money_text(self.total),
        }
        if self.credits or self.credit_balance_before:
            # Only where credit is in play: an invoice without any is the spec's shape (amount due =
            # total).
            credit = self.customer_credit
            body["credits"] = [c.to_json_dict() for c in self.credits]
            body["customer_credit"] = credit.to_json_dict()
            body["amount_due"] = money_text(credit.amount_due)
        body["generated_at"] = generated_at
        return body


def invoice_id(tenant_id: str, period: Period) -> str:
    return f"{tenant_id}-{period.label}"


def usage_lines(plan: Plan, plan_id: str, billable_seconds_total: int) -> list[InvoiceLine]:
    """Included, overage (per tier), cap and blocked-overage lines for a period's billable seconds."""
    if billable_seconds_total < 0:
        msg = f"billable seconds cannot be negative, got {billable_seconds_total}"
        raise RatingError(msg)
    included = min(billable_seconds_total, plan.included_seconds)
    overage = billable_seconds_total - included
    lines = [
        InvoiceLine(
            code="included_seconds",
            description=f"Included seconds used, of {plan.included_seconds} in plan {plan_id}",
            quantity=str(included),
            unit_price="0",
            amount=_ZERO,
        )
    ]
    if plan.overage == "block":
        if overage > 0:
            lines.append(
                InvoiceLine(
                    code="blocked_overage_seconds",
                    description="Seconds beyond the allowance on a hard-stop plan (not charged)",
                    quantity=str(overage),
                    unit_price="0",
                    amount=_ZERO,
                )
            )
        return lines
    charged = _ZERO
    lower = 0
    for tier in plan.overage_tiers:
        upper = overage if tier.up_to is None else min(overage, tier.up_to)
        seconds = upper - lower
        if seconds <= 0:
            break
        amount = round_cents(Decimal(seconds) * tier.rate)
        charged += amount
        span = f"{lower + 1}-{tier.up_to}" if tier.up_to is not None else f"above {lower}"
        lines.append(
            InvoiceLine(
                code="overage_seconds",
                description=f"Overage seconds {span} at {decimal_text(tier.rate)} per second",
                quantity=str(seconds),
                unit_price=decimal_text(tier.rate),
                amount=amount,
            )
        )
        lower = upper
    if plan.overage_cap is not None and charged > plan.overage_cap:
        lines.append(
            InvoiceLine(
                code="overage_cap",
                description=f"Overage capped at {decimal_text(plan.overage_cap)}",
                quantity="1",
                unit_price="0",
                amount=round_cents(plan.overage_cap - charged),
            )
        )
    return lines


def build_invoice(
    *,
    tenant_id: str,
    period: Period,
    timeline: TenantTimeline,
    catalog: Catalog,
    billable_seconds_total: int,
    extra_lines: Sequence[InvoiceLine] = (),
) -> Invoice:
    plan_id = timeline.plan_for_period(period)
    region = timeline.tax_region_for_period(period)
    if plan_id is None or region is None:
        msg = f"no subscription of tenant {tenant_id!r} covers the period starting {period.start_date}"
        raise NoSubscriptionError(msg)
    plan = catalog.plan_for(plan_id, period.start)
    tax_rate = catalog.tax_rate(region)
    lines = [
        InvoiceLine(
            code="base_fee",
            description=f"Plan {plan_id}, {period.start_date} to {period.end_date}",
            quantity="1",
            unit_price=decimal_text(plan.base_fee),
            amount=round_cents(plan.base_fee),
        ),
        *usage_lines(plan, plan_id, billable_seconds_total),
    ]
    for charge in timeline.number_charges(period, plan):
        kind = "Local" if charge.number_type == "LOCAL" else "Toll-free"
        if charge.included:
            note = "included in plan"
        elif charge.full_period:
            note = "full period"
        else:
            note = f"from {charge.first_active.date()}, pro-rated"
        lines.append(
            InvoiceLine(
                code="number",
                description=f"{kind} number {charge.number} ({note})",
                quantity=charge.quantity_text,
                unit_price=decimal_text(charge.unit_price),
                amount=charge.amount,
                number=charge.number,
            )
        )
    lines.append(
        InvoiceLine(
            code="employees_peak",
            description=f"Peak AI employees active at once (plan allows {plan.employees.max_active})",
            quantity=str(timeline.employees_peak(period)),
            unit_price="0",
            amount=_ZERO,
        )
    )
    lines.extend(extra_lines)
    subtotal = sum((line.amount for line in lines), _ZERO)
    tax = (subtotal * tax_rate).quantize(_CENT, rounding=ROUND_HALF_UP)
    return Invoice(
        invoice_id=invoice_id(tenant_id, period),
        tenant_id=tenant_id,
        plan_id=plan_id,
        period=period,
        currency=catalog.currency,
        catalog_revision=catalog.revision,
        lines=lines,
        subtotal=subtotal,
        tax_rate=tax_rate,
        tax=round_cents(tax),
        total=subtotal + round_cents(tax),
    )
