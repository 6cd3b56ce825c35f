"""Pricing fixes through replay, final invoices, adjustments, late calls."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.commands.simulate import SimulationConfig, write_file
from pipeline.settings import Settings
from rating.batch import invoices_for_month
from rating.catalog import parse_catalog
from tests.integration.cli import (
    EXAMPLES,
    callmeter,
    comparable,
    ledger_report,
    read_invoices,
    reference_events,
    worker_stats,
)
from tests.integration.test_ledger_sql_e2e import doc_queries, finance_panels

pytestmark = pytest.mark.integration

EXPECTED = {p.stem: json.loads(p.read_text()) for p in sorted((EXAMPLES / "expected").glob("*.json"))}
# Revision 2 fixes starter's first overage tier (0.0200 -> 0.0250) and pro's rate (0.0100 -> 0.0120).
REV1 = (EXAMPLES / "catalog.yaml").read_text()
REV2 = (
    REV1.replace("revision: 1", "revision: 2")
    .replace('{up_to: 600, rate: "0.0200"}', '{up_to: 600, rate: "0.0250"}')
    .replace('{up_to: null, rate: "0.0100"}', '{up_to: null, rate: "0.0120"}')
)
ALL_NOVEMBER = ("--from", "2026-10-01T00:00:00Z", "--to", "2026-12-16T00:00:00Z")


def rev2(tmp_path: Path) -> str:
    path = tmp_path / "catalog-rev2.yaml"
    path.write_text(REV2)
    return str(path)


def adjustments(invoice: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (line["corrects_invoice"], line["amount"])
        for line in invoice["lines"]
        if line["code"] == "adjustment"
    ]


def rate_and_finalize_examples(env: dict[str, str], tmp_path: Path) -> None:
    callmeter(env, "produce", str(EXAMPLES / "events.jsonl"))
    worker_stats(env)
    out = callmeter(
        env, "invoice", "--period", "2026-11", "--out", str(tmp_path / "nov"), "--finalize"
    ).stdout
    assert [line.rsplit(" ", 1)[-1] for line in out.splitlines()] == ["final"] * 3
    got = read_invoices(tmp_path / "nov")
    assert {k: comparable(v) for k, v in got.items()} == {k: comparable(v) for k, v in EXPECTED.items()}
    assert {invoice["status"] for invoice in got.values()} == {"final"}


def test_pricing_fix_replay_carries_the_difference_once(cm_env: dict[str, str], tmp_path: Path) -> None:
    rate_and_finalize_examples(cm_env, tmp_path)
    final_bytes = {p.name: p.read_bytes() for p in (tmp_path / "nov").glob("*.json")}
    catalog = rev2(tmp_path)
    before = ledger_report(cm_env)

    dry = callmeter(cm_env, "--catalog", catalog, "replay", *ALL_NOVEMBER, "--dry-run").stdout
    assert "acme            2026-11-01           69.52         72.52        +3.00" in dry
    assert "bolt            2026-11-15          204.00        204.00         0.00" in dry  # capped at 5.00
    assert ledger_report(cm_env) == before  # a dry run writes nothing

    callmeter(cm_env, "--catalog", catalog, "replay", *ALL_NOVEMBER)
    after = ledger_report(cm_env)
    assert after["rated_calls"] == before["rated_calls"] * 2  # one new row per call, revision 2

    # Final invoices are never rewritten...
    callmeter(cm_env, "--catalog", catalog, "invoice", "--period", "2026-11", "--out", str(tmp_path / "nov2"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "nov2").glob("*.json")} == final_bytes
    # ...the next invoice carries the difference, naming the invoice it corrects.
    callmeter(cm_env, "--catalog", catalog, "invoice", "--period", "2026-12", "--out", str(tmp_path / "dec"))
    dec = read_invoices(tmp_path / "dec")
    assert adjustments(dec["acme-20261201"]) == [("acme-20261101", "3.00")]
    line = next(x for x in dec["acme-20261201"]["lines"] if x["code"] == "adjustment")
    assert "revision 2" in line["description"]
    assert adjustments(dec["bolt-20261215"]) == [] and adjustments(dec["dime-20261201"]) == []
    assert Decimal(dec["acme-20261201"]["subtotal"]) == sum(
        Decimal(x["amount"]) for x in dec["acme-20261201"]["lines"]
    )

    # Replaying again adds nothing.
    callmeter(cm_env, "--catalog", catalog, "replay", *ALL_NOVEMBER)
    assert ledger_report(cm_env)["rated_calls"] == after["rated_calls"]
    callmeter(cm_env, "--catalog", catalog, "invoice", "--period", "2026-12", "--out", str(tmp_path / "dec2"))
    assert adjustments(read_invoices(tmp_path / "dec2")["acme-20261201"]) == [("acme-20261101", "3.00")]

    # The ledger now holds revision 2: the old catalog is refused with a one-line reason.
    proc = callmeter(cm_env, "invoice", "--period", "2026-12", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 1 and "older than revision 2" in proc.stderr and proc.stderr.count("\n") == 1
    # And revision 2 cannot be reused for different prices.
    changed = tmp_path / "rev2-changed.yaml"
    changed.write_text(REV2.replace('base_fee: "49.00"', 'base_fee: "59.00"'))
    proc = callmeter(cm_env, "--catalog", str(changed), "replay", *ALL_NOVEMBER, check=False)
    assert proc.returncode == 1 and "raise `revision`" in proc.stderr


# A price fix downwards: starter's base fee 49.00 -> 19.00 and its overage tiers 0.0200 -> 0.0100 and
# 0.0150 -> 0.0050. November's final acme invoice charged 40.01 too much before tax.
REV2_LOWER = (
    REV1.replace("revision: 1", "revision: 2")
    .replace('base_fee: "49.00"', 'base_fee: "19.00"')
    .replace('{up_to: 600, rate: "0.0200"}', '{up_to: 600, rate: "0.0100"}')
    .replace('{up_to: null, rate: "0.0150"}', '{up_to: null, rate: "0.0050"}')
)


def test_a_price_fix_that_lowers_a_final_invoice_is_a_customer_credit(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    """Not a negative line taxed at the next invoice's rate: a credit taxed at the corrected invoice's
    rate, applied to what later invoices make due and carried forward (docs/decisions.md)."""
    rate_and_finalize_examples(cm_env, tmp_path)
    catalog = tmp_path / "catalog-rev2-lower.yaml"
    catalog.write_text(REV2_LOWER)
    cm = ("--catalog", str(catalog))
    # 19.00 + 600 x 0.0100 + 401 x 0.0050 (2.005 -> 2.01) + 2.50 = 29.51, was 69.52.
    dry = callmeter(cm_env, *cm, "replay", *ALL_NOVEMBER, "--dry-run").stdout
    assert "acme            2026-11-01           69.52         29.51       -40.01" in dry
    callmeter(cm_env, *cm, "replay", *ALL_NOVEMBER)

    callmeter(cm_env, *cm, "invoice", "--period", "2026-12", "--out", str(tmp_path / "dec"))
    dec = read_invoices(tmp_path / "dec")["acme-20261201"]
    # December's own charges, taxed as they are: 19.00 + the toll-free number's 5.00 (the local one is
    # included) = 24.00, tax 2.13 (2.13), total 26.13. No adjustment line, no negative amount.
    assert dec["status"] == "draft"
    assert [line["code"] for line in dec["lines"]] == [
        "base_fee",
        "included_seconds",
        "number",
        "number",
        "employees_peak",
    ]
    assert (dec["subtotal"], dec["tax_rate"], dec["tax"], dec["total"]) == (
        "24.00",
        "0.08875",
        "2.13",
        "26.13",
    )
    # November's overcharge: 40.01 and the tax it carried at November's rate, 3.55 (3.5508875).
    assert dec["credits"] == [
        {
            "code": "credit",
            "description": "Correction of invoice acme-20261101: re-rated with catalog revision 2",
            "corrects_invoice": "acme-20261101",
            "amount": "-40.01",
            "tax_rate": "0.08875",
            "tax": "-3.55",
            "total": "-43.56",
        }
    ]
    assert dec["customer_credit"] == {
        "balance_before": "0.00",
        "granted": "43.56",
        "applied": "26.13",
        "balance_after": "17.43",
    }
    assert dec["amount_due"] == "0.00"
    # The other tenants' prices did not change: no credit, the spec's shape.
    others = read_invoices(tmp_path / "dec")
    assert not {"credits", "customer_credit", "amount_due"} & (
        set(others["bolt-20261215"]) | set(others["dime-20261201"])
    )

    # December becomes final; January applies what is left of the balance, and November is not
    # credited twice.
    callmeter(
        cm_env, *cm, "invoice", "--period", "2026-12", "--out", str(tmp_path / "dec-final"), "--finalize"
    )
    assert (
        read_invoices(tmp_path / "dec-final")["acme-20261201"]["customer_credit"]["balance_after"] == "17.43"
    )
    callmeter(cm_env, *cm, "invoice", "--period", "2027-01", "--out", str(tmp_path / "jan"))
    jan = read_invoices(tmp_path / "jan")["acme-20270101"]
    assert (jan["subtotal"], jan["tax"], jan["total"]) == ("24.00", "2.13", "26.13")
    assert jan["credits"] == []
    assert jan["customer_credit"] == {
        "balance_before": "17.43",
        "granted": "0.00",
        "applied": "17.43",
        "balance_after": "0.00",
    }
    assert jan["amount_due"] == "8.70"
    assert adjustments(jan) == []

    # The ledger: the credit with its tax, what December applied, and the balance per tenant.
    rows = json.loads(
        callmeter(
            cm_env,
            "sql",
            "SELECT kind, carried_on_invoice_id, corrects_invoice_id, amount, tax_rate, tax, status "
            "FROM adjustments_current ORDER BY carried_on_invoice_id",
            "--format",
            "json",
        ).stdout
    )
    assert rows == [
        {
            "kind": "credit",
            "carried_on_invoice_id": "acme-20261201",
            "corrects_invoice_id": "acme-20261101",
            "amount": "-40.01",
            "tax_rate": "0.08875",
            "tax": "-3.55",
            "status": "final",
        }
    ]
    # The finance dashboard's revenue nets the credit where it was granted: December's starter revenue
    # is the 26.13 charged less the 43.56 credited; November's final invoice stays as issued.
    panel = finance_panels()["Revenue by plan and period (invoiced, tax included)"]
    revenue = json.loads(callmeter(cm_env, "sql", panel, "--format", "json").stdout)
    assert {r["period"]: r["total"] for r in revenue if r["plan_id"] == "starter"} == {
        "2026-11-01": "75.69",
        "2026-12-01": "-17.43",
    }
    # docs/ledger.md's ready query for balances.
    balances = callmeter(cm_env, "sql", doc_queries()["Q13"], "--format", "json").stdout
    assert json.loads(balances) == [
        {"tenant_id": "acme", "granted_total": "43.56", "applied_total": "26.13", "balance": "17.43"}
    ]


def test_replay_from_the_ledger_once_the_topic_data_is_gone(cm_env: dict[str, str], tmp_path: Path) -> None:
    rate_and_finalize_examples(cm_env, tmp_path)
    # What retention does to a topic, done at once: the log start offset moves past every record.
    settings = Settings(topic_prefix=cm_env["CALLMETER_TOPIC_PREFIX"], partitions=3)
    admin = AdminClient({"bootstrap.servers": cm_env["CALLMETER_KAFKA"]})
    futures = admin.delete_records([TopicPartition(settings.topics.calls, p, -1) for p in range(3)])
    for future in futures.values():
        future.result()
    catalog = rev2(tmp_path)
    proc = callmeter(cm_env, "--catalog", catalog, "replay", *ALL_NOVEMBER, "--source", "kafka", check=False)
    assert proc.returncode == 1 and "--source ledger" in proc.stderr
    proc = callmeter(cm_env, "--catalog", catalog, "replay", *ALL_NOVEMBER)
    assert "from ledger" in proc.stderr
    assert "acme            2026-11-01           69.52         72.52        +3.00" in proc.stdout
    callmeter(cm_env, "--catalog", catalog, "invoice", "--period", "2026-12", "--out", str(tmp_path / "dec"))
    assert adjustments(read_invoices(tmp_path / "dec")["acme-20261201"]) == [("acme-20261101", "3.00")]


def test_a_late_call_for_a_final_period_is_one_adjustment(cm_env: dict[str, str], tmp_path: Path) -> None:
    rate_and_finalize_examples(cm_env, tmp_path)
    late = {
        "type": "call",
        "event_id": "late-1",
        "tenant_id": "acme",
        "call_id": "c-late",
        "employee_id": None,
        "direction": "INBOUND",
        "from_number": "+15550000001",
        "to_number": "+15551110001",
        "started_at": "2026-11-20T10:00:00Z",
        "answered_at": "2026-11-20T10:00:00Z",
        "ended_at": "2026-11-20T10:01:40Z",
        "disposition": "ANSWERED",
        "gateway_id": "gw-1",
    }
    path = tmp_path / "late.jsonl"
    path.write_text(json.dumps(late) + "\n")
    for attempt in range(2):  # the same late call, sent twice
        callmeter(cm_env, "produce", str(path))
        stats = worker_stats(cm_env)
        assert stats["rated"] == (1 if attempt == 0 else 0)
        report = ledger_report(cm_env)
        assert report["late_rated_calls"] == 1
        callmeter(cm_env, "invoice", "--period", "2026-12", "--out", str(tmp_path / f"dec{attempt}"))
        dec = read_invoices(tmp_path / f"dec{attempt}")
        # 100 s more in the 0.0150 tier: 501 s = 7.515 -> 7.52 instead of 401 s = 6.015 -> 6.02.
        assert adjustments(dec["acme-20261201"]) == [("acme-20261101", "1.50")]
        assert (
            "1 late call"
            in next(x for x in dec["acme-20261201"]["lines"] if x["code"] == "adjustment")["description"]
        )
    # November's usage total is right, its final invoice untouched.
    assert report["billable_seconds_by_tenant"]["acme"] == 19601 + 100
    callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(tmp_path / "nov-again"))
    assert read_invoices(tmp_path / "nov-again") == read_invoices(tmp_path / "nov")


def _reference_subtotals(events: Path, catalog_text: str) -> dict[str, Decimal]:
    calls, provisioning = reference_events(events)
    invoices = invoices_for_month(calls, provisioning, parse_catalog(catalog_text), 2026, 10)
    return {inv.tenant_id: inv.subtotal for inv in invoices}


def test_replay_killed_halfway_and_rerun_ends_at_the_same_numbers(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    write_file(SimulationConfig(tenants=4, calls=4000, duplicate_rate=0.02, late_rate=0.0, seed=23), events)
    callmeter(cm_env, "produce", str(events))
    worker_stats(cm_env)
    callmeter(cm_env, "invoice", "--period", "2026-10", "--out", str(tmp_path / "oct"), "--finalize")
    catalog = rev2(tmp_path)
    window = ("--from", "2026-09-01T00:00:00Z", "--to", "2026-12-31T00:00:00Z")
    replay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "--catalog",
            catalog,
            "replay",
            *window,
            "--batch-size",
            "100",
        ],
        env=cm_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert replay.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = replay.stderr.readline()
        assert line, "replay ended before it could be killed"
        if "calls re-rated" in line:
            written, total = (int(x) for x in line.split("]")[1].split()[0].split("/"))
            if 0 < written < total:
                replay.send_signal(signal.SIGKILL)
                break
    replay.wait(30)
    assert replay.returncode == -signal.SIGKILL
    callmeter(cm_env, "--catalog", catalog, "replay", *window)
    callmeter(cm_env, "--catalog", catalog, "invoice", "--period", "2026-11", "--out", str(tmp_path / "nov"))
    nov = read_invoices(tmp_path / "nov")
    old, new = _reference_subtotals(events, REV1), _reference_subtotals(events, REV2)
    for tenant, old_subtotal in old.items():
        expected = new[tenant] - old_subtotal
        got = [Decimal(a) for c, a in adjustments(nov[next(k for k in nov if k.startswith(tenant))])]
        assert got == ([expected] if expected else []), tenant
