"""The `callmeter` commands that read or write the ledger: invoice, replay, usage, ledger, sql
(cli.py parses the command line and dispatches to them)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError, PipelineError
from pipeline.ledgerquery.reads import LedgerReads
from pipeline.local.clients import kafka, make_serde
from pipeline.settings import Settings
from rating.periods import parse_month

if TYPE_CHECKING:
    from sinks.ledger import Ledger


def cmd_invoice(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from pipeline.catalogs import read_catalog
    from pipeline.invoicing.files import write_outputs
    from pipeline.invoicing.job import run_invoices
    from pipeline.progress import Progress
    from sinks.catalogs import register_catalog
    from sinks.ledger import Ledger

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        msg = f"--out {out} is a file; it must name a directory (invoices are written as <invoice_id>.json)"
        raise InputError(msg)
    catalog, text = read_catalog(settings.catalog)
    incomplete = _ledger_incomplete(settings, args)
    progress = Progress()
    ledger = Ledger.open(settings.clickhouse_dsn, settings.clickhouse_secret, settings.clickhouse_cluster)
    try:
        register_catalog(ledger, catalog, text)
        outputs = run_invoices(
            ledger,
            catalog,
            args.period,
            args.tenant,
            finalize=args.finalize,
            settlement_window=timedelta(hours=settings.settlement_window_hours),
            now=settings.clock_now,
            incomplete=incomplete,
            progress=progress,
        )
        if not outputs:
            # Never silent. Nothing ingested or an unknown tenant is a mistake (exit 1); tenants whose
            # subscriptions have no period starting in the month is a legitimate empty month (exit 0).
            why, failed = _nothing_to_invoice(ledger, args.period, args.tenant)
            if failed:
                raise InputError(why)
            print(f"callmeter: {why}", file=sys.stderr)
            return 0
        progress.phase(f"writing {len(outputs)} invoices", unit="")
        paths = write_outputs(ledger, outputs, out)
    finally:
        progress.close()
        ledger.close()
    for path, output in zip(paths, outputs, strict=True):
        adjusted = f" ({len(output.adjustments)} adjustment(s))" if output.adjustments else ""
        flag = " incomplete" if incomplete and not output.stored else ""
        print(f"{path}  {output.status}{flag}{adjusted}")
    return 0


def _nothing_to_invoice(ledger: Ledger, period: str, tenant: str | None) -> tuple[str, bool]:
    """Why ``run_invoices`` found no invoice to make, in one line, and whether that is a failure."""
    known = {row["tenant_id"] for row in LedgerReads(ledger).provisioning_rows(tenant)}
    if not known:
        if tenant:
            return f"nothing to invoice: the ledger has no provisioning events of tenant {tenant!r}", True
        return (
            "nothing to invoice: the ledger has no provisioning events yet "
            "(`callmeter produce` them, then run `callmeter worker --until-idle`)"
        ), True
    if tenant:
        who = f"tenant {tenant!r}"
    else:
        who = (
            "the one tenant in the ledger"
            if len(known) == 1
            else f"any of the {len(known)} tenants in the ledger"
        )
    return f"nothing to invoice: no subscription of {who} has a billing period starting in {period}", False


def _ledger_incomplete(settings: Settings, args: argparse.Namespace) -> bool:
    """Refuse (or, with --allow-incomplete, flag) invoices from a ledger the pipeline has not finished:
    inputs not consumed or outputs not written up to the end of the invoiced periods plus the
    settlement window (pipeline/invoicing/completeness.py)."""
    from datetime import UTC, datetime, timedelta

    from confluent_kafka import KafkaException

    from pipeline.errors import BrokerError
    from pipeline.invoicing.completeness import ledger_lag
    from pipeline.invoicing.job import month_window

    year, month = parse_month(args.period)
    next_start = month_window(year, month)[1]
    # Every period starting in the month has ended by the end of the following month.
    cutoff = month_window(next_start.year, next_start.month)[1] + timedelta(
        hours=settings.settlement_window_hours
    )
    try:
        lagging = ledger_lag(
            settings,
            kafka(settings, create_topics=False),
            min(cutoff, settings.clock_now or datetime.now(UTC)),
        )
        problem = (
            f"the ledger is incomplete: {len(lagging)} partition(s) not yet consumed or written: "
            f"{', '.join(lagging[:3])}{' ...' if len(lagging) > 3 else ''}; "
            "run `callmeter worker --until-idle`"
            if lagging
            else ""
        )
    except (BrokerError, KafkaException) as exc:
        problem = f"cannot check that the ledger is complete: {exc}"
    if not problem:
        return False
    if not args.allow_incomplete:
        msg = f"{problem} (or pass --allow-incomplete for drafts)"
        raise PipelineError(msg)
    if args.finalize:
        msg = f"{problem}; a final invoice is never made from an incomplete ledger"
        raise PipelineError(msg)
    print(f"callmeter: warning: {problem}; writing drafts marked incomplete", file=sys.stderr)
    return True


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.replay.job import run_replay

    return run_replay(settings, args)


def cmd_ledger(settings: Settings, _args: argparse.Namespace) -> int:
    """Row counts (deduplicated) and dead letters by reason: a quick look for on-call and tests."""
    from sinks.columns import COLUMNS
    from sinks.ledger import Ledger

    ledger = Ledger.open(settings.clickhouse_dsn, settings.clickhouse_secret, settings.clickhouse_cluster)
    try:
        reads = LedgerReads(ledger)
        report: dict[str, Any] = {table: reads.count(table) for table in COLUMNS}
        report["dead_letters_by_reason"] = reads.dead_letter_counts()
        report["billable_seconds_by_tenant"] = reads.billable_seconds_by_tenant()
        report["late_rated_calls"] = ledger.query("SELECT count() FROM rated_calls FINAL WHERE late = 1")[0][
            0
        ]
        report["final_invoices"] = len(reads.invoice_rows(status="final"))
    finally:
        ledger.close()
    print(json.dumps(report, sort_keys=True))
    return 0


def cmd_sql(settings: Settings, args: argparse.Namespace) -> int:
    """Read-only SQL against the ledger (pipeline/ledgerquery/sql.py), through the process holding it if any,
    within the limits of the flags; rows are written as they come (pipeline/commands/sql_output.py)."""
    from pipeline.commands.sql_output import write_result
    from pipeline.ledgerquery.sql import open_query
    from sinks.readonly import QueryLimitError, QueryLimits

    query = sys.stdin.read() if args.query == "-" else args.query
    if not query.strip():
        msg = "sql: the query is empty"
        raise InputError(msg)
    limits = QueryLimits(args.max_rows, args.max_seconds, args.max_memory_mb)
    try:
        with open_query(settings.clickhouse_dsn, settings.clickhouse_secret, query, limits) as stream:
            write_result(stream, args.format, sys.stdout)
            truncated = stream.truncated
    except QueryLimitError as exc:
        flag = {"seconds": "--max-seconds", "memory": "--max-memory-mb"}[exc.limit]
        msg = f"{exc} (raise it with {flag})"
        raise PipelineError(msg) from exc
    if truncated:
        sys.stdout.flush()
        msg = (
            f"more than {args.max_rows} rows: printed the first {args.max_rows} "
            "(raise --max-rows, 0 for no limit, or add a LIMIT)"
        )
        raise PipelineError(msg)
    return 0


def cmd_usage(settings: Settings, args: argparse.Namespace) -> int:
    """A tenant's usage review (pipeline/commands/usage.py) from the ledger and the alerts topic."""
    from datetime import UTC, datetime

    from pipeline.catalogs import read_catalog
    from pipeline.commands.usage import render_json, render_text, review, sent_alerts

    month = parse_month(args.period) if args.period else None
    catalog = read_catalog(settings.catalog)[0]
    alerts = sent_alerts(settings, kafka(settings, create_topics=False), make_serde(settings), args.tenant)
    now = settings.clock_now or datetime.now(UTC)
    result = review(settings, catalog, args.tenant, month, now, alerts)
    sys.stdout.write(render_json(result) if args.json else render_text(result))
    return 0
