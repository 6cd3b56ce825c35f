"""The pricing catalog (spec §3): validated from YAML text, money kept exactly as written.

Every decimal is parsed from its YAML string so it keeps its written scale: invoices print
``unit_price`` and ``tax_rate`` exactly as the catalog spells them ("0.0200", "0.20"). A bare YAML
float is refused rather than guessed at, because by the time it reaches us it is already binary.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from itertools import pairwise
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rating.alerts import DEFAULT_THRESHOLDS_PERCENT, threshold_problem
from rating.errors import CatalogError, UnknownPlanError
from rating.periods import require_utc


def _exact_decimal(value: Any) -> Any:
    if isinstance(value, bool | float):
        msg = 'write decimals as quoted strings (e.g. "0.0200") so no precision is lost'
        raise ValueError(msg)
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        try:
            parsed = Decimal(value.strip())
        except InvalidOperation:
            msg = f"{value!r} is not a decimal number"
            raise ValueError(msg) from None
        if not parsed.is_finite():
            msg = f"{value!r} is not a finite decimal"
            raise ValueError(msg)
        return parsed
    return value


Money = Annotated[Decimal, BeforeValidator(_exact_decimal), Field(ge=0)]


def _thresholds(values: tuple[int, ...] | None) -> tuple[int, ...] | None:
    problem = threshold_problem(values or ())
    if problem is not None:
        raise ValueError(problem)
    return tuple(sorted(values)) if values is not None else None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rounding(_Model):
    minimum_seconds: int = Field(ge=0)
    increment_seconds: int = Field(ge=1)


class Tier(_Model):
    up_to: int | None = Field(gt=0)
    rate: Money


class NumberPricing(_Model):
    included_local: int = Field(ge=0)
    local_fee: Money
    toll_free_fee: Money
    max: int = Field(ge=0)


class EmployeeLimits(_Model):
    max_active: int = Field(ge=0)


class Plan(_Model):
    base_fee: Money
    included_seconds: int = Field(ge=0)
    overage: Literal["charge", "block"]
    overage_tiers: list[Tier] = Field(min_length=1)
    overage_cap: Money | None = None
    rounding: Rounding
    numbers: NumberPricing
    employees: EmployeeLimits
    # Usage alert thresholds of tenants on this plan that set none themselves; unset: the catalog's.
    alert_thresholds_percent: tuple[int, ...] | None = None

    _check_thresholds = field_validator("alert_thresholds_percent")(_thresholds)

    @field_validator("overage_tiers")
    @classmethod
    def _tiers_graduate(cls, tiers: list[Tier]) -> list[Tier]:
        # up_to bounds are cumulative overage seconds, so they must rise and end open-ended.
        if tiers[-1].up_to is not None:
            msg = "the last overage tier must have up_to: null"
            raise ValueError(msg)
        bounds = [t.up_to for t in tiers[:-1]]
        if any(b is None for b in bounds):
            msg = "only the last overage tier may have up_to: null"
            raise ValueError(msg)
        if any(a >= b for a, b in pairwise(bounds) if a is not None and b is not None):
            msg = "overage tier up_to values must be strictly ascending"
            raise ValueError(msg)
        return tiers


class PriceBook(_Model):
    id: str = Field(min_length=1)
    effective_from: AwareDatetime
    plans: dict[str, Plan]

    @field_validator("effective_from")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class Catalog(_Model):
    revision: int = Field(ge=0)
    currency: str = Field(min_length=1)
    tax_regions: dict[str, Annotated[Decimal, BeforeValidator(_exact_decimal), Field(ge=0)]]
    price_books: list[PriceBook] = Field(min_length=1)
    # Usage alert thresholds (percent of included seconds) of every plan that names none.
    alert_thresholds_percent: tuple[int, ...] = Field(default=DEFAULT_THRESHOLDS_PERCENT, min_length=1)

    _check_thresholds = field_validator("alert_thresholds_percent")(_thresholds)

    @model_validator(mode="after")
    def _books_unambiguous(self) -> Catalog:
        starts = [book.effective_from for book in self.price_books]
        if len(set(starts)) != len(starts):
            msg = "two price books share one effective_from; which applies would be ambiguous"
            raise ValueError(msg)
        ids = [book.id for book in self.price_books]
        if len(set(ids)) != len(ids):
            msg = "price book ids must be unique"
            raise ValueError(msg)
        return self

    def price_book_for(self, period_start: datetime) -> PriceBook | None:
        """The book whose ``effective_from`` is the latest at or before ``period_start``."""
        at = require_utc(period_start, "period_start")
        eligible = [book for book in self.price_books if book.effective_from <= at]
        return max(eligible, key=lambda book: book.effective_from) if eligible else None

    def plan_for(self, plan_id: str, period_start: datetime) -> Plan:
        book = self.price_book_for(period_start)
        if book is None:
            msg = f"no price book is effective at {period_start.isoformat()}"
            raise UnknownPlanError(msg)
        plan = book.plans.get(plan_id)
        if plan is None:
            msg = f"plan {plan_id!r} is not in price book {book.id!r}"
            raise UnknownPlanError(msg)
        return plan

    def has_plan(self, plan_id: str) -> bool:
        return any(plan_id in book.plans for book in self.price_books)

    def tax_rate(self, region: str) -> Decimal:
        rate = self.tax_regions.get(region)
        if rate is None:
            msg = f"tax region {region!r} is not in the catalog"
            raise CatalogError(msg)
        return rate


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "catalog"
    more = exc.error_count() - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"invalid catalog at {where}: {first['msg']}{suffix}"


def parse_catalog(text: str) -> Catalog:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        msg = f"catalog is not valid YAML{where}"
        raise CatalogError(msg) from None
    if not isinstance(data, dict):
        msg = "catalog must be a YAML mapping with revision, currency, tax_regions and price_books"
        raise CatalogError(msg)
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(_one_line(exc)) from None
