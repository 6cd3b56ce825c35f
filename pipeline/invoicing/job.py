"""The invoice job: ledger + catalog -> one JSON invoice per tenant period, stored back in the ledger.

It reads only deduplicated facts (provisioning through FINAL, each call's current rating through
argMax by catalog revision) and leaves every pricing rule to ``rating/`` — the same functions the
reference batch computation in tests uses, so the pipeline and the reference cannot drift apart.

Final invoices (docs/decisions.md "Final invoices and adjustments"):
- ``--finalize``, or the settlement window after the period end having passed, makes an invoice final.
  A final invoice is never recomputed or rewritten: re-running the job writes its stored text again.
- When a replay (a higher catalog revision) or a late call changes what a final invoice F should have
  said, the difference (recomputed subtotal - F's subtotal - what final invoices already carried) goes
  on the tenant's invoice being computed for a later period, naming F and why: more is an
  ``adjustment`` line (a charge, taxed with that invoice); less is a customer credit, taxed at F's rate
  and applied with the tenant's credit balance to what is due (rating/credit.py, docs/decisions.md
  "Credits: a customer balance").
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from pipeline.errors import PipelineError
from pipeline.invoicing.files import InvoiceOutput, invoice_json
from pipeline.ledgerquery.reads import LedgerReads, call_from_facts
from pipeline.progress import Progress, disabled
from rating.batch import invoices_from_usage
from rating.calls import RatedCall, rate_call
from rating.catalog import Catalog
from rating.credit import Credit
from rating.invoice import DRAFT, FINAL, Invoice, InvoiceLine, build_invoice, money_text
from rating.models import ProvisioningEvent
from rating.periods import Period, parse_month
from rating.subscription import TenantTimeline
from sinks.catalogs import catalog_at_revision
from sinks.ledger import Ledger


def month_window(year: int, month: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def timelines_from_ledger(ledger: Ledger, tenant: str | None = None) -> dict[str, TenantTimeline]:
    events: dict[str, list[ProvisioningEvent]] = defaultdict(list)
    for row in LedgerReads(ledger).provisioning_rows(tenant):
        events[row["tenant_id"]].append(ProvisioningEvent(**row))
    return {t: TenantTimeline.from_events(t, evs) for t, evs in events.items()}


@dataclass(frozen=True)
class RatedFacts:
    """Each deduplicated call rated against its tenant's whole timeline: what invoices are made of."""

    usage_seconds: dict[tuple[str, date], int]  # (tenant, period start date) -> billable seconds
    revision: dict[tuple[str, date], int]  # highest catalog revision the stream or a replay rated with
    late: dict[tuple[str, date], int]  # calls flagged late (rated after their period was final)
    # (tenant, event) -> (period start, plan, billable seconds) of every call a subscription covers
    ratings: dict[tuple[str, str], tuple[datetime, str, int]]


def _calls_window(year: int, month: int) -> tuple[datetime, datetime]:
    """Started-at bounds that contain every call of every period starting in the month: a period is
    at most a month long, so its calls started before the end of the following month."""
    start, end = month_window(year, month)
    after_next = month_window(end.year, end.month)[1]
    return start, after_next


def rate_facts(
    ledger: Ledger,
    catalog: Catalog,
    timelines: dict[str, TenantTimeline],
    started_from: datetime,
    started_to: datetime,
    tenant: str | None = None,
    progress: Progress | None = None,
) -> RatedFacts:
    """Rate every call of the window against the full timeline with ``catalog`` (rating/ does it all).

    The ordering rule (docs/decisions.md, "Order of events"): the invoice is a pure function of the
    deduplicated events and the catalog, whatever order the worker consumed them in and however it
    rated them at the time."""
    usage: dict[tuple[str, date], int] = defaultdict(int)
    revision: dict[tuple[str, date], int] = defaultdict(int)
    late: dict[tuple[str, date], int] = defaultdict(int)
    ratings: dict[tuple[str, str], tuple[datetime, str, int]] = {}
    progress = progress or disabled()
    progress.phase("reading calls from the ledger", unit="")
    rows = LedgerReads(ledger).call_facts(started_from, started_to, tenant)
    progress.phase("rating calls", len(rows), "calls")
    for done, (tenant_id, event_id, started, answered, ended, disposition, rev, was_late) in enumerate(rows):
        progress.update(done)
        timeline = timelines.get(tenant_id)
        if timeline is None:
            continue
        call = call_from_facts(tenant_id, event_id, started, answered, ended, disposition)
        rated = rate_call(call, timeline, catalog)
        if not isinstance(rated, RatedCall):
            continue  # e.g. a cancellation consumed after the call: no subscription covers it
        key = (tenant_id, rated.period.start_date)
        ratings[(tenant_id, event_id)] = (rated.period.start, rated.plan_id, rated.billable_seconds)
        usage[key] += rated.billable_seconds
        revision[key] = max(revision[key], rev)
        late[key] += int(was_late)
    progress.update(len(rows))
    return RatedFacts(dict(usage), dict(revision), dict(late), ratings)


def _compute(
    ledger: Ledger, catalog: Catalog, period: str, tenant: str | None, progress: Progress | None = None
) -> tuple[list[Invoice], RatedFacts]:
    year, month = parse_month(period)
    timelines = timelines_from_ledger(ledger, tenant)
    facts = rate_facts(ledger, catalog, timelines, *_calls_window(year, month), tenant, progress)
    return invoices_from_usage(timelines, facts.usage_seconds, catalog, year, month), facts


def stage_corrections(
    ledger: Ledger, catalog: Catalog, facts: RatedFacts, period: str, tenant: str | None, now: datetime
) -> int:
    """Append a ``rating_corrections`` row (flushed with the invoices) for every call whose rating
    against the whole timeline differs from its current rating in the ledger: the stream rated it
    before provisioning that governs it was consumed. Rows are added, never edited; a re-run
    finds the corrections already current and adds nothing. Only for calls whose current rating was
    made with this catalog revision: a newer catalog is a replay's business."""
    staged = 0
    for (tenant_id, event_id), (start, plan, billable, revision) in (
        LedgerReads(ledger).current_rating_of(*_calls_window(*parse_month(period)), tenant).items()
    ):
        if revision != catalog.revision:
            continue
        new = facts.ratings.get((tenant_id, event_id))
        new_start, new_plan, new_billable = new if new is not None else (None, "", 0)
        if (start, plan, billable) == (new_start, new_plan, new_billable) or (new is None and start is None):
            continue
        if new is None:
            reason = "no subscription covers the call (provisioning consumed after it)"
        else:
            changes = []
            if start != new_start and new_start is not None:
                was = start.date().isoformat() if start else "none"
                changes.append(f"period {was} -> {new_start.date().isoformat()}")
            if plan != new_plan:
                changes.append(f"plan {plan or 'none'} -> {new_plan}")
            if billable != new_billable:
                changes.append(f"billable {billable} -> {new_billable} s")
            reason = "re-rated against the full provisioning history: " + ", ".join(changes)
        ledger.add(
            "rating_corrections",
            {
                "tenant_id": tenant_id,
                "event_id": event_id,
                "period_start": new_start,
                "plan_id": new_plan,
                "billable_seconds": new_billable,
                "catalog_revision": revision,
                "reason": reason,
                "corrected_at": now,
            },
        )
        staged += 1
    return staged


def _period_of(row: dict[str, Any]) -> Period:
    start, end = row["period_start"], row["period_end"]
    return Period(
        datetime(start.year, start.month, start.day, tzinfo=UTC),
        datetime(end.year, end.month, end.day, tzinfo=UTC),
    )


def _adjustments(
    ledger: Ledger, catalog: Catalog, timeline: TenantTimeline, draft: Invoice, finals: list[dict[str, Any]]
) -> list[tuple[str, Decimal, str, Decimal]]:
    """(corrected invoice, amount before tax, why, its tax rate) for each final invoice of an earlier
    period whose recomputation differs from what it and the final invoices after it already said."""
    out = []
    for final in finals:
        period = _period_of(final)
        if period.start >= draft.period.start:
            continue
        tenant_id = final["tenant_id"]
        timelines = {tenant_id: timeline}
        key = (tenant_id, period.start_date)
        seen = rate_facts(ledger, catalog, timelines, period.start, period.end, tenant_id)
        revision, late = seen.revision.get(key, 0), seen.late.get(key, 0)
        rated_with = catalog_at_revision(ledger, max(revision, int(final["catalog_revision"])), catalog)
        if rated_with is not catalog:
            seen = rate_facts(ledger, rated_with, timelines, period.start, period.end, tenant_id)
        now = build_invoice(
            tenant_id=tenant_id,
            period=period,
            timeline=timeline,
            catalog=rated_with,
            billable_seconds_total=seen.usage_seconds.get(key, 0),
        )
        carried = LedgerReads(ledger).carried_adjustments(
            final["invoice_id"], excluding_carrier=draft.invoice_id
        )
        delta = now.subtotal - Decimal(final["subtotal"]) - carried
        if delta == 0:
            continue
        why = []
        if revision > int(final["catalog_revision"]):
            why.append(f"re-rated with catalog revision {revision}")
        if late:
            why.append(f"{late} late call{'s' if late != 1 else ''}")
        rate = Decimal(json.loads(str(final["body"]))["tax_rate"])
        out.append((final["invoice_id"], delta, ", ".join(why) or "recomputed", rate))
    return out


def run_invoices(
    ledger: Ledger,
    catalog: Catalog,
    period: str,
    tenant: str | None = None,
    *,
    finalize: bool = False,
    settlement_window: timedelta = timedelta(hours=48),
    now: datetime | None = None,
    incomplete: bool = False,
    progress: Progress | None = None,
) -> list[InvoiceOutput]:
    """Invoices of the periods starting in the month. ``finalize`` makes them final (refused, with
    nothing written, for a period that has not ended); ``incomplete`` marks drafts made from a ledger
    the pipeline has not finished, which never become final."""
    now = now or datetime.now(UTC)
    stored = {row["invoice_id"]: row for row in LedgerReads(ledger).invoice_rows(tenant)}
    finals_by_tenant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in stored.values():
        if row["status"] == "final":
            finals_by_tenant[row["tenant_id"]].append(row)
    timelines = timelines_from_ledger(ledger, tenant)
    outputs = []
    progress = progress or disabled()
    drafts, facts = _compute(ledger, catalog, period, tenant, progress)
    progress.phase("checking the stream's ratings", unit="")
    stage_corrections(ledger, catalog, facts, period, tenant, now)
    balances = LedgerReads(ledger).credit_balances([draft.invoice_id for draft in drafts], tenant)
    progress.phase("building invoices", len(drafts), "invoices")
    for done, draft in enumerate(drafts):
        progress.update(done)
        previous = stored.get(draft.invoice_id)
        if previous is not None and previous["status"] == "final":
            outputs.append(InvoiceOutput(draft, str(previous["body"]), "final", stored=True))
            continue
        timeline = timelines[draft.tenant_id]
        adjustments = _adjustments(ledger, catalog, timeline, draft, finals_by_tenant[draft.tenant_id])
        credits = tuple(
            Credit(corrects, f"Correction of invoice {corrects}: {why}", amount, rate)
            for corrects, amount, why, rate in adjustments
            if amount < 0
        )
        invoice = draft
        if len(credits) < len(adjustments):
            lines = [
                InvoiceLine(
                    code="adjustment",
                    description=f"Correction of invoice {corrects}: {why}",
                    quantity="1",
                    unit_price=money_text(amount),
                    amount=amount,
                    corrects_invoice=corrects,
                )
                for corrects, amount, why, _rate in adjustments
                if amount > 0
            ]
            invoice = build_invoice(
                tenant_id=draft.tenant_id,
                period=draft.period,
                timeline=timeline,
                catalog=catalog,
                billable_seconds_total=_seconds(draft),
                extra_lines=lines,
            )
        if finalize and now < invoice.period.end:
            msg = (
                f"cannot finalize {invoice.invoice_id}: its period runs until "
                f"{invoice.period.end_date.isoformat()}"
            )
            raise InvoiceRefused(msg)
        final = not incomplete and (finalize or now >= invoice.period.end + settlement_window)
        balance = balances.get(invoice.tenant_id, Decimal("0.00"))
        invoice = replace(
            invoice, status=FINAL if final else DRAFT, credits=credits, credit_balance_before=balance
        )
        text = invoice_json(invoice, now, incomplete=incomplete)
        carried = tuple((corrects, amount, why) for corrects, amount, why, _rate in adjustments)
        outputs.append(InvoiceOutput(invoice, text, invoice.status, False, carried))
    return outputs


class InvoiceRefused(PipelineError):
    """The invoices asked for cannot be made as asked (nothing is written)."""


def _seconds(invoice: Invoice) -> int:
    used = 0
    for line in invoice.lines:
        if line.code in ("included_seconds", "overage_seconds", "blocked_overage_seconds"):
            used += int(line.quantity)
    return used
