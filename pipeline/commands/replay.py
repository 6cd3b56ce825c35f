"""`callmeter replay`: re-rate the calls that started in a time range with the current catalog.

Protocol (idempotent, so a killed replay is simply run again):
1. Check the catalog against the ledger: never older than a revision already used, and a revision
   number never stands for two catalogs (pipeline/catalogs.py).
2. Read the calls: from the ``calls`` topic (seek by timestamp, read to the end offsets taken at the
   start) while its retention still covers the range, else from the raw events in the ledger.
   ``--source`` forces either. Duplicates in the source are dropped (first seen wins); the live path's
   dedupe state is not consulted or changed.
3. Rate each call with the tenant's timeline from the ledger and the current catalog.
4. Unless ``--dry-run``, append one rated row per call with the current catalog revision, in batches
   with insert-deduplication tokens. Rows are keyed by (tenant_id, event_id, catalog_revision): a
   second run, or the rest of a killed run, writes rows identical to the first; nothing is edited.
5. Print, per tenant period touched, the subtotal (before tax) before and after and the difference.

The live worker's balances are not touched (they count seconds; prices live in the catalog), and
finalized invoices are not rewritten: the next invoice carries the difference as an adjustment.
With the embedded ClickHouse (one process per chdb path) run replay while the worker is stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from pipeline.catalogs import catalog_at_revision, read_catalog, register_catalog
from pipeline.commands.invoicing import timelines_from_ledger
from pipeline.errors import InputError
from pipeline.records import call_from_record, rated_call_row, rated_to_record
from pipeline.settings import Settings
from rating.calls import RatedCall, rate_call
from rating.catalog import Catalog
from rating.invoice import build_invoice, money_text
from rating.models import CallEvent, Rejection
from rating.periods import Period
from schemas.errors import SerdeError
from schemas.json_events import parse_json_event
from schemas.serde import Serde
from sinks.ledger import Ledger


@dataclass(frozen=True)
class SourcedCall:
    call: CallEvent
    topic: str
    partition: int
    offset: int


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


# -- sources -------------------------------------------------------------------------------------------
def _consumer(settings: Settings, bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            # Never committed: replay must not move any group's offsets.
            "group.id": f"{settings.app_id}-replay-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )


def kafka_covers(settings: Settings, bootstrap: str, ts_from: datetime) -> bool:
    """True when no record the range may need has been deleted from the calls topic."""
    consumer = _consumer(settings, bootstrap)
    try:
        topic = settings.topics.calls
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        for partition in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if low == 0:
                continue
            if low >= high:
                return False  # everything ever written here is gone
            consumer.assign([TopicPartition(topic, partition, low)])
            msg = consumer.poll(10)
            if msg is None or msg.error() is not None or msg.timestamp()[1] > ts_from.timestamp() * 1000:
                return False
        return True
    finally:
        consumer.close()


def calls_from_kafka(
    settings: Settings, bootstrap: str, serde: Serde, ts_from: datetime, ts_to: datetime, tenant: str | None
) -> Iterator[SourcedCall]:
    consumer = _consumer(settings, bootstrap)
    topic = settings.topics.calls
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        # A call is published after it started, so nothing it needs has a record timestamp before ts_from.
        wanted = [TopicPartition(topic, p, int(ts_from.timestamp() * 1000)) for p in meta.partitions]
        starts = consumer.offsets_for_times(wanted, timeout=10)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        }
        assign = [tp for tp in starts if tp.offset >= 0 and tp.offset < ends[tp.partition]]
        if not assign:
            return
        consumer.assign(assign)
        remaining = {tp.partition for tp in assign}
        while remaining:
            msg = consumer.poll(5)
            if msg is None:
                # read_committed stops short of an open transaction's records; nothing else is pending.
                break
            if msg.error() is not None:
                continue
            partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
            if offset >= ends[partition] - 1:
                remaining.discard(partition)
            if offset >= ends[partition]:
                continue
            try:
                name, record = serde.decode(msg.value() or b"")
            except SerdeError:
                continue  # it went to the dead-letter topic when it arrived; replay rates calls only
            if name != "CallRecord" or (tenant and record.get("tenant_id") != tenant):
                continue
            if ts_from <= record["started_at"] < ts_to:
                yield SourcedCall(call_from_record(record), topic, partition, offset)
    finally:
        consumer.close()


def calls_from_ledger(
    ledger: Ledger, ts_from: datetime, ts_to: datetime, tenant: str | None
) -> Iterator[SourcedCall]:
    import json

    for payload, partition, offset in ledger.raw_calls(ts_from, ts_to, tenant):
        name, record = parse_json_event({"type": "call", **json.loads(payload)})
        if name == "CallRecord":
            yield SourcedCall(call_from_record(record), "calls", int(partition), int(offset))


# -- the replay ----------------------------------------------------------------------------------------
def _charges(
    ledger: Ledger,
    catalog: Catalog,
    timelines: dict[str, Any],
    key: tuple[str, datetime],
    seconds: int,
    revision: int,
) -> Decimal:
    tenant, start = key
    timeline = timelines[tenant]
    period = Period(start, timeline.period_at(start).end)
    used = catalog_at_revision(ledger, revision, catalog)
    return build_invoice(
        tenant_id=tenant, period=period, timeline=timeline, catalog=used, billable_seconds_total=seconds
    ).subtotal


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.commands.clients import kafka, make_serde

    ts_from, ts_to = parse_ts(args.ts_from, "--from"), parse_ts(args.ts_to, "--to")
    if ts_to <= ts_from:
        msg = "--to must be later than --from"
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
    sourced: Iterator[SourcedCall],
    source: str,
    ts_from: datetime,
    ts_to: datetime,
    args: argparse.Namespace,
) -> int:
    timelines = timelines_from_ledger(ledger, args.tenant)
    # Each call's current rating (corrections included), the one the ledger's usage totals count:
    # event -> (period start or None, plan, billable seconds, catalog revision).
    current = ledger.current_rating_of(ts_from, ts_to, args.tenant)
    seen: set[tuple[str, str]] = set()
    rated: list[tuple[SourcedCall, RatedCall]] = []
    skipped: dict[str, int] = defaultdict(int)
    for item in sourced:
        identity = (item.call.tenant_id, item.call.event_id)
        if identity in seen:
            continue
        seen.add(identity)
        timeline = timelines.get(item.call.tenant_id)
        if timeline is None:
            skipped["NO_SUBSCRIPTION"] += 1
            continue
        result = rate_call(item.call, timeline, catalog)
        if isinstance(result, Rejection):
            skipped[str(result.reason)] += 1
            continue
        rated.append((item, result))

    usage = ledger.usage_seconds(datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC))
    before: dict[tuple[str, datetime], int] = defaultdict(int)
    after: dict[tuple[str, datetime], int] = defaultdict(int)
    revisions: dict[tuple[str, datetime], int] = defaultdict(int)
    for item, result in rated:
        tenant_id = item.call.tenant_id
        key = (tenant_id, result.period.start)
        old = current.get((tenant_id, item.call.event_id))
        old_key = (tenant_id, old[0]) if old is not None and old[0] is not None else None
        for k in (key, old_key):
            if k is not None:
                before.setdefault(k, usage.get(k, 0))
                after.setdefault(k, usage.get(k, 0))
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
        batch: list[list[Any]] = []
        written = 0
        for item, result in rated:
            record = rated_to_record(
                result, source_topic=item.topic, source_partition=item.partition, source_offset=item.offset
            )
            batch.append(rated_call_row(record, late=False))
            if len(batch) >= args.batch_size:
                written += _write(ledger, batch, catalog.revision)
                _progress(written, total)
        if batch:
            written += _write(ledger, batch, catalog.revision)
            _progress(written, total)

    rows = []
    for key in sorted(before):  # (tenant, period start)
        old_money = _charges(ledger, catalog, timelines, key, before[key], revisions[key] or catalog.revision)
        new_money = _charges(ledger, catalog, timelines, key, after[key], catalog.revision)
        rows.append((key[0], key[1].date().isoformat(), old_money, new_money, new_money - old_money))
    print(format_table(rows))
    if skipped:
        print("not rated: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))
    return 0


def _write(ledger: Ledger, batch: list[list[Any]], revision: int) -> int:
    first, last = batch[0], batch[-1]
    token = f"replay:{revision}:{first[0]}:{first[1]}:{last[0]}:{last[1]}:{len(batch)}"
    ledger.write_rows("rated_calls", batch, dedup_token=token)
    n = len(batch)
    batch.clear()
    return n


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
