"""`callmeter replay`: re-rate the calls that started in a time range with the current catalog.

Protocol (idempotent, so a killed replay is simply run again):
1. Check the catalog against the ledger: never older than a revision already used, and a revision
   number never stands for two catalogs (pipeline/catalogs.py).
2. Read the calls: from the ``calls`` topic (seek by timestamp, read to the end offsets taken at the
   start) while its retention still covers the range, else from the raw events in the ledger.
   ``--source`` forces either (pipeline/replay/sources.py: timestamps stay integer epoch millis).
   Duplicates in the source are dropped (first seen wins); the live path's dedupe state is not
   consulted or changed.
3. Rate each call with the tenant's timeline from the ledger and the current catalog
   (rating/bulk.py: ``rate_call``'s answers, with the period and plan cached per tenant period).
4. Unless ``--dry-run``, append one rated row per call with the current catalog revision, one
   column-oriented insert per ``--batch-size`` calls, each with an insert-deduplication token naming
   the revision, its first and last call and its size. Rows are keyed by (tenant_id, event_id,
   catalog_revision): a second run, or the rest of a killed run, writes rows identical to the first
   but for ``rated_at`` (one instant per run), which collapse with them; nothing is edited.
5. Print, per tenant period touched, the subtotal (before tax) before and after and the difference.

The live worker's balances are not touched (they count seconds; prices live in the catalog), and
finalized invoices are not rewritten: the next invoice carries the difference as an adjustment.
With the embedded ClickHouse (one process per chdb path) run replay while the worker is stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pipeline.catalogs import read_catalog
from pipeline.errors import InputError
from pipeline.invoicing.job import timelines_from_ledger
from pipeline.ledgerquery.reads import LedgerReads
from pipeline.replay.sources import CallFacts, calls_from_kafka, calls_from_ledger, kafka_covers
from pipeline.settings import Settings
from rating.bulk import BulkRating, TenantRater, millis_of
from rating.catalog import Catalog
from rating.invoice import build_invoice, money_text
from rating.models import Rejection
from rating.periods import Period
from sinks.catalogs import catalog_at_revision, register_catalog
from sinks.ledger import Ledger


def parse_ts(text: str, flag: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        msg = f"{flag} {text!r} is not an RFC 3339 timestamp"
        raise InputError(msg) from exc
    if parsed.tzinfo is None:
        msg = f"{flag} {text!r} needs a UTC offset (e.g. 2026-11-01T00:00:00Z)"
        raise InputError(msg)
    return parsed.astimezone(UTC)


# -- the replay ----------------------------------------------------------------------------------------
def _charges(used: Catalog, timelines: dict[str, Any], key: tuple[str, datetime], seconds: int) -> Decimal:
    tenant, start = key
    timeline = timelines[tenant]
    period = Period(start, timeline.period_at(start).end)
    return build_invoice(
        tenant_id=tenant, period=period, timeline=timeline, catalog=used, billable_seconds_total=seconds
    ).subtotal


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.local.clients import kafka, make_serde

    ts_from, ts_to = parse_ts(args.ts_from, "--from"), parse_ts(args.ts_to, "--to")
    if ts_to <= ts_from:
        msg = "--to must be later than --from"
        raise InputError(msg)
    if args.batch_size < 1:
        msg = f"--batch-size must be at least 1, got {args.batch_size}"
        raise InputError(msg)
    catalog, text = read_catalog(settings.catalog)
    ledger = Ledger.open(settings.clickhouse_dsn, settings.clickhouse_secret, settings.clickhouse_cluster)
    try:
        if not args.dry_run:
            register_catalog(ledger, catalog, text)
        elif catalog.revision < ledger.max_catalog_revision():
            register_catalog(ledger, catalog, text)  # raises the same refusal, writes nothing
        source = args.source
        bootstrap = ""
        if source in ("auto", "kafka"):
            bootstrap = kafka(settings, create_topics=False)
            covered = kafka_covers(settings, bootstrap, ts_from)
            if source == "kafka" and not covered:
                msg = "the calls topic no longer holds the whole range (retention); use --source ledger"
                raise InputError(msg)
            source = "kafka" if covered else "ledger"
        if source == "kafka":
            sourced = calls_from_kafka(settings, bootstrap, make_serde(settings), ts_from, ts_to, args.tenant)
        else:
            sourced = calls_from_ledger(ledger, ts_from, ts_to, args.tenant)
        return _replay(ledger, catalog, sourced, source, ts_from, ts_to, args)
    finally:
        ledger.close()


def _replay(
    ledger: Ledger,
    catalog: Catalog,
    sourced: Iterator[CallFacts],
    source: str,
    ts_from: datetime,
    ts_to: datetime,
    args: argparse.Namespace,
) -> int:
    began = time.monotonic()
    timelines = timelines_from_ledger(ledger, args.tenant)
    # Each call's current rating (corrections included), the one the ledger's usage totals count:
    # event -> (period start or None, plan, billable seconds, catalog revision).
    current = LedgerReads(ledger).current_rating_of(ts_from, ts_to, args.tenant)
    seen: set[tuple[str, str]] = set()
    raters: dict[str, TenantRater] = {}
    rated: list[tuple[CallFacts, BulkRating]] = []
    skipped: dict[str, int] = defaultdict(int)
    for item in sourced:
        identity = (item.tenant_id, item.event_id)
        if identity in seen:
            continue
        seen.add(identity)
        rater = raters.get(item.tenant_id)
        if rater is None:
            timeline = timelines.get(item.tenant_id)
            if timeline is None:
                skipped["NO_SUBSCRIPTION"] += 1
                continue
            rater = raters[item.tenant_id] = TenantRater(timeline, catalog)
        result = rater.rate(
            item.started_millis, item.answered_millis, item.ended_millis, item.disposition, item.to_call
        )
        if isinstance(result, Rejection):
            skipped[str(result.reason)] += 1
            continue
        rated.append((item, result))

    usage = LedgerReads(ledger).usage_seconds(
        datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)
    )
    before: dict[tuple[str, datetime], int] = defaultdict(int)
    after: dict[tuple[str, datetime], int] = defaultdict(int)
    revisions: dict[tuple[str, datetime], int] = defaultdict(int)
    for item, result in rated:
        tenant_id = item.tenant_id
        key = (tenant_id, result.period.start)
        old = current.get((tenant_id, item.event_id))
        old_key = (tenant_id, old[0]) if old is not None and old[0] is not None else None
        for k in (key, old_key):
            if k is not None and k not in before:
                before[k] = after[k] = usage.get(k, 0)
        if old is not None:
            revisions[key] = max(revisions[key], old[3])
            if old_key is not None:
                # The old seconds leave the period they are counted in now, which a correction may
                # have moved away from the period the new rating puts the call in.
                after[old_key] -= old[2]
                revisions[old_key] = max(revisions[old_key], old[3])
        after[key] += result.billable_seconds

    total = len(rated)
    mode = "dry run, nothing written" if args.dry_run else f"writing catalog revision {catalog.revision}"
    print(
        f"replay {ts_from.isoformat()} .. {ts_to.isoformat()} from {source}: {total} calls ({mode})",
        file=sys.stderr,
        flush=True,
    )
    if not args.dry_run:
        rated_at = millis_of(datetime.now(UTC))  # one instant for the whole run
        written = 0
        for first in range(0, total, args.batch_size):
            batch = rated[first : first + args.batch_size]
            written += _write(ledger, batch, catalog.revision, rated_at)
            _progress(written, total)

    elapsed = time.monotonic() - began
    print(
        f"replay: {total} calls read, rated{'' if args.dry_run else ' and written'} in {elapsed:.2f} s "
        f"({total / max(elapsed, 1e-9):,.0f} calls/s)",
        file=sys.stderr,
        flush=True,
    )
    catalogs: dict[int, Catalog] = {catalog.revision: catalog}  # revision -> catalog, read once each
    rows = []
    for key in sorted(before):  # (tenant, period start)
        revision = revisions[key] or catalog.revision
        if revision not in catalogs:
            catalogs[revision] = catalog_at_revision(ledger, revision, catalog)
        old_money = _charges(catalogs[revision], timelines, key, before[key])
        new_money = _charges(catalog, timelines, key, after[key])
        rows.append((key[0], key[1].date().isoformat(), old_money, new_money, new_money - old_money))
    print(format_table(rows))
    if skipped:
        print("not rated: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))
    return 0


# rated_calls column -> CallFacts field.
FACT_COLUMNS = {
    **{name: name for name in ("tenant_id", "event_id", "call_id", "employee_id", "direction")},
    **{name: name for name in ("from_number", "to_number", "disposition", "gateway_id")},
    "started_at": "started_millis",
    "answered_at": "answered_millis",
    "ended_at": "ended_millis",
    "source_partition": "source_partition",
    "source_offset": "source_offset",
}


def _write(ledger: Ledger, batch: list[tuple[CallFacts, BulkRating]], revision: int, rated_at: int) -> int:
    """One insert of ``rated_calls`` columns (sinks/schema.py order) for a batch of rated calls."""
    first, last = batch[0][0], batch[-1][0]
    token = (
        f"replay:{revision}:{first.tenant_id}:{first.event_id}:{last.tenant_id}:{last.event_id}:{len(batch)}"
    )
    facts = [item for item, _ in batch]
    ratings = [r for _, r in batch]
    n = len(batch)
    # The call's own fields and where it was read, timestamps as epoch millis, from CallFacts.
    columns: dict[str, list[Any]] = {
        column: [getattr(f, field) for f in facts] for column, field in FACT_COLUMNS.items()
    }
    columns.update(
        period_start=[r.period_start_millis for r in ratings],
        period_end=[r.period_end_millis for r in ratings],
        plan_id=[r.plan_id for r in ratings],
        raw_seconds=[f"{r.raw_millis // 1000}.{r.raw_millis % 1000:03d}" for r in ratings],  # Decimal(18, 3)
        billable_seconds=[r.billable_seconds for r in ratings],
        catalog_revision=[revision] * n,
        late=[0] * n,  # a replay rates history, not a late arrival
        rated_at=[rated_at] * n,
    )
    return ledger.insert_columns("rated_calls", columns, dedup_token=token)


def _progress(written: int, total: int) -> None:
    width = 30
    filled = width * written // max(total, 1)
    bar = "#" * filled + "." * (width - filled)
    end = "\r" if sys.stderr.isatty() else "\n"
    print(f"[{bar}] {written}/{total} calls re-rated", end=end, file=sys.stderr, flush=True)
    if sys.stderr.isatty() and written >= total:
        print(file=sys.stderr)
    time.sleep(0)


def format_table(rows: list[tuple[str, str, Decimal, Decimal, Decimal]]) -> str:
    header = f"{'tenant':<16}{'period':<12}{'old subtotal':>14}{'new subtotal':>14}{'difference':>13}"
    lines = [header, "-" * len(header)]
    for tenant, period, old, new, diff in rows:
        sign = "+" if diff > 0 else ""
        lines.append(
            f"{tenant:<16}{period:<12}{money_text(old):>14}{money_text(new):>14}{sign + money_text(diff):>13}"
        )
    total = sum((r[4] for r in rows), Decimal("0"))
    lines.append("-" * len(header))
    lines.append(f"{'total':<28}{'':>28}{('+' if total > 0 else '') + money_text(total):>13}")
    # The demo and invoices show totals with tax; an adjustment is carried before tax and taxed on the
    # invoice that carries it, so this table speaks in subtotals and says so.
    lines.append("(subtotals: amounts before tax, as carried by the adjustment on the next invoice)")
    return "\n".join(lines)
