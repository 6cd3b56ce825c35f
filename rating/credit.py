"""Customer credit: what a correction that lowers a final invoice becomes, and how invoices use it.

A final invoice is never changed. When a re-rating (a replay after a price fix) or a late event shows
that a final invoice charged too much, the difference is not a negative line on the tenant's next
invoice (that would make the next invoice negative and tax the refund at the next invoice's rate). It
is a credit to the customer, the way Stripe's credit notes credit a customer balance:

- taxed at the rate of the invoice it corrects: the tax that invoice collected on the overcharge is
  given back at the rate it was collected at, whatever the rate of the invoice that carries the credit;
- held as the tenant's credit balance, which each later invoice applies to its total (after tax:
  the balance already includes tax) before anything is due; what an invoice cannot use is carried
  forward to the next one.

An invoice's own subtotal, tax and total are therefore never reduced by a credit: they are the
charges of its period (and corrections that raise an earlier invoice, which are charges too).
docs/decisions.md, "Credits: a customer balance", says why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from rating.errors import RatingError

_CENT = Decimal("0.01")
_ZERO = Decimal("0.00")


def _money(amount: Decimal) -> str:
    return format(amount.quantize(_CENT, rounding=ROUND_HALF_UP), "f")


@dataclass(frozen=True)
class Credit:
    """A correction that lowers the final invoice ``corrects_invoice``: ``amount`` is before tax and
    negative (what it should have charged minus what it did), ``tax_rate`` that invoice's rate."""

    corrects_invoice: str
    description: str
    amount: Decimal
    tax_rate: Decimal

    def __post_init__(self) -> None:
        if self.amount >= 0 or self.amount != self.amount.quantize(_CENT):
            msg = f"a credit is a negative amount in cents, got {self.amount} for {self.corrects_invoice}"
            raise RatingError(msg)
        if self.tax_rate < 0:
            msg = f"a tax rate cannot be negative, got {self.tax_rate} for {self.corrects_invoice}"
            raise RatingError(msg)

    @property
    def tax(self) -> Decimal:
        """Rounded once, half up (away from zero for a negative amount), as an invoice's tax is; a tax
        that rounds to nothing is 0.00, not -0.00."""
        tax = (self.amount * self.tax_rate).quantize(_CENT, rounding=ROUND_HALF_UP)
        return tax if tax else _ZERO

    @property
    def total(self) -> Decimal:
        return self.amount + self.tax

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "code": "credit",
            "description": self.description,
            "corrects_invoice": self.corrects_invoice,
            "amount": _money(self.amount),
            "tax_rate": format(self.tax_rate, "f"),
            "tax": _money(self.tax),
            "total": _money(self.total),
        }


@dataclass(frozen=True)
class CustomerCredit:
    """One invoice's use of the tenant's credit balance. Every amount is >= 0 and in cents:
    ``balance_before + granted = applied + balance_after`` and ``amount_due = total - applied``."""

    balance_before: Decimal
    granted: Decimal
    applied: Decimal
    balance_after: Decimal
    amount_due: Decimal

    def to_json_dict(self) -> dict[str, str]:
        return {
            "balance_before": _money(self.balance_before),
            "granted": _money(self.granted),
            "applied": _money(self.applied),
            "balance_after": _money(self.balance_after),
        }


def customer_credit(total: Decimal, balance_before: Decimal, credits: Iterable[Credit]) -> CustomerCredit:
    """Apply the balance the tenant held before this invoice, plus the credits granted on it, to the
    invoice's ``total``: as much as the total, never more (nothing is paid out); the rest is carried."""
    if balance_before < 0:
        msg = f"a credit balance cannot be negative, got {balance_before}"
        raise RatingError(msg)
    granted = -sum((credit.total for credit in credits), _ZERO)
    available = balance_before + granted
    applied = min(available, max(total, _ZERO))
    return CustomerCredit(balance_before, granted, applied, available - applied, total - applied)
