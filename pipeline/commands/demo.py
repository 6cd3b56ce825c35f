"""`callmeter demo`: local broker, a simulated month, the worker until idle, invoices, a summary."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.settings import Settings
from rating.catalog import Catalog
from rating.invoice import Invoice

DEMO_MONTH = (2026, 10)


def _seconds(invoice: Invoice) -> tuple[int, int]:
    used = overage = 0
    for line in invoice.lines:
        if line.code == "included_seconds":
            used += int(line.quantity)
        elif line.code in ("overage_seconds", "blocked_overage_seconds"):
            used += int(line.quantity)
            overage += int(line.quantity)
    return used, overage


def counts_text(counts: dict[str, int]) -> str:
    """``name=count`` pairs, as `callmeter produce` prints them (never a Python dict repr)."""
    return " ".join(f"{name}={n}" for name, n in sorted(counts.items())) or "none"


def summary_table(invoices: list[Invoice]) -> str:
    header = f"{'tenant':<14}{'plan':<10}{'seconds':>10}{'overage s':>11}{'total':>12}"
    rows = [header, "-" * len(header)]
    grand = Decimal("0")
    for inv in invoices:
        used, overage = _seconds(inv)
        rows.append(
            f"{inv.tenant_id:<14}{inv.plan_id:<10}{used:>10}{overage:>11}"
            f"{inv.currency + ' ' + str(inv.total):>12}"
        )
        grand += inv.total
    rows.append("-" * len(header))
    rows.append(f"{'all tenants':<45}{grand!s:>12}")
    return "\n".join(rows)


def run_demo(settings: Settings, catalog: Catalog, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from pipeline.commands.produce import produce_files
    from pipeline.commands.simulate import SimulationConfig, write_file
    from pipeline.invoicing.files import write_outputs
    from pipeline.invoicing.job import run_invoices
    from pipeline.ledgerquery.reads import LedgerReads
    from pipeline.local.broker import LocalKafka
    from pipeline.local.clients import make_serde
    from pipeline.topics import ensure_topics
    from sinks.ledger import Ledger

    t0 = time.monotonic()
    bootstrap = settings.kafka or LocalKafka(settings).up()
    ensure_topics(settings, bootstrap)
    print(f"[1/5] kafka {settings.kafka_version} at {bootstrap} ({time.monotonic() - t0:.0f}s)")

    year, month = DEMO_MONTH
    events = settings.data_dir / "demo" / "events.jsonl"
    cfg = SimulationConfig(tenants=args.tenants, calls=args.calls, year=year, month=month, seed=7)
    counts = write_file(cfg, events)
    serde = make_serde(settings)
    sent = produce_files(settings, bootstrap, serde, [events])
    print(
        f"[2/5] simulated {year}-{month:02d}: {sum(counts.values())} events "
        f"({counts['call']} call records incl. retries, {counts['provisioning']} provisioning) "
        f"-> published {counts_text(sent)}"
    )

    stats = _worker_until_idle(settings, bootstrap)
    duplicates: dict[str, int] = stats["duplicates"]
    in_ledger = stats.get("duplicates_in_ledger", {}).get("call", 0)
    # A call rated again by the stream but already in the ledger (a rerun past the dedupe retention)
    # is not billed twice: say so, or "rated N" would read as N new billable calls.
    again = f" ({in_ledger} of them already in the ledger: not billed again)" if in_ledger else ""
    print(
        f"[3/5] worker idle: rated {stats['rated']}{again}, duplicates dropped {sum(duplicates.values())}, "
        f"dead letters {sum(stats['dead_letters'].values())}, parked then rated {stats['unparked']}"
    )

    ledger = Ledger.open(settings.clickhouse_dsn)
    try:
        outputs = run_invoices(
            ledger,
            catalog,
            f"{year}-{month:02d}",
            settlement_window=timedelta(hours=settings.settlement_window_hours),
        )
        invoices = [o.invoice for o in outputs]
        out = settings.data_dir / "invoices" / f"{year}-{month:02d}"
        write_outputs(ledger, outputs, out)
        dead = LedgerReads(ledger).dead_letter_counts()
        rated_rows = LedgerReads(ledger).count("rated_calls")
    finally:
        ledger.close()
    print(f"[4/5] {len(invoices)} invoices written to {out}")
    print(f"[5/5] summary ({time.monotonic() - t0:.0f}s)\n")
    print(summary_table(invoices))
    print(f"\nledger: {rated_rows} rated calls; dead letters by reason: {counts_text(dead)}")
    print(f"duplicates dropped this run: {counts_text(duplicates)}")
    print(f"invoices: {Path(out).resolve()}")
    return 0


def _worker_until_idle(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """`callmeter worker --until-idle` as operators run it: supervised, restarted after a fault."""
    env = dict(os.environ)
    env.update(
        CALLMETER_DATA_DIR=str(settings.data_dir.resolve()),
        CALLMETER_CATALOG=str(settings.catalog.resolve()),
        CALLMETER_KAFKA=bootstrap,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "worker", "--until-idle"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        msg = f"worker exited {proc.returncode}; see its reason above"
        raise PipelineError(msg)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result
