"""Invoices do not depend on the order in which calls and provisioning reach the worker.

Each test produces the provisioning that governs some calls only *after* a `worker --until-idle` run
has already rated those calls, then checks the invoice against exact figures and against `rating/`'s
batch computation over all the events.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.cli import (
    BackgroundWorker,
    callmeter,
    comparable,
    ledger_report,
    read_invoices,
    worker_stats,
)
from tests.integration.eventfiles import call, example_catalog, prov, reference_invoices, write_events

pytestmark = pytest.mark.integration


def _run_in_two_steps(
    env: dict[str, str], tmp_path: Path, first: list[dict], second: list[dict], period: str
) -> tuple[dict[str, dict], dict[str, dict]]:
    a = write_events(tmp_path / "first.jsonl", first)
    b = write_events(tmp_path / "second.jsonl", second)
    callmeter(env, "produce", str(a))
    worker_stats(env)
    callmeter(env, "produce", str(b))
    worker_stats(env)
    out = tmp_path / f"out-{period}"
    callmeter(env, "invoice", "--period", period, "--out", str(out))
    got = {k: comparable(v) for k, v in read_invoices(out).items()}
    year, month = (int(x) for x in period.split("-"))
    return got, reference_invoices([a, b], year, month, example_catalog())


def _lines(invoice: dict) -> dict[str, tuple[str, str]]:
    return {line["code"]: (line["quantity"], line["amount"]) for line in invoice["lines"]}


def test_plan_change_consumed_after_the_calls_it_governs(cm_env: dict[str, str], tmp_path: Path) -> None:
    """The issue's reproduction: pro rounds a 59 s call up to its 60 s minimum."""
    first = [
        prov(
            "s1", "t1", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
        ),
        call("c1", "t1", "2026-11-02T10:00:00Z", 600),
        call("c2", "t1", "2026-11-02T11:00:00Z", 59),
    ]
    second = [prov("pc", "t1", "2026-10-20T00:00:00Z", "PLAN_CHANGED", plan_id="pro")]
    got, expected = _run_in_two_steps(cm_env, tmp_path, first, second, "2026-11")
    assert got == expected
    invoice = got["t1-20261101"]
    assert invoice["plan_id"] == "pro"
    assert _lines(invoice)["included_seconds"] == ("600", "0.00")
    assert _lines(invoice)["overage_seconds"] == ("60", "0.60")
    assert invoice["subtotal"] == "199.60"
    # The ledger keeps the stream's ratings and adds one correction per re-rated call, with why.
    report = ledger_report(cm_env)
    assert report["rated_calls"] == 2
    assert report["rating_corrections"] == 2
    assert report["billable_seconds_by_tenant"] == {"t1": 660}
    callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(tmp_path / "again"))
    assert ledger_report(cm_env)["rating_corrections"] == 2  # a re-run adds nothing


def test_cancellation_consumed_after_later_calls(cm_env: dict[str, str], tmp_path: Path) -> None:
    first = [
        prov(
            "s1", "t2", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
        ),
        call("c1", "t2", "2026-10-10T10:00:00Z", 100),
        call("c2", "t2", "2026-11-05T10:00:00Z", 200),
    ]
    second = [prov("x", "t2", "2026-10-20T00:00:00Z", "SUBSCRIPTION_CANCELLED")]
    got, expected = _run_in_two_steps(cm_env, tmp_path, first, second, "2026-11")
    # The November period starts after the cancellation: it is not invoiced at all.
    assert got == expected == {}
    callmeter(cm_env, "invoice", "--period", "2026-10", "--out", str(tmp_path / "oct"))
    october = read_invoices(tmp_path / "oct")["t2-20261001"]
    assert _lines(october)["included_seconds"] == ("100", "0.00")


def test_block_plan_changed_to_charging_plan_after_the_calls(cm_env: dict[str, str], tmp_path: Path) -> None:
    first = [
        prov("s1", "t3", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="hardstop", tax_region="GB"),
        call("c1", "t3", "2026-11-03T10:00:00Z", 100),
        call("c2", "t3", "2026-11-04T10:00:00Z", 100),
    ]
    second = [prov("pc", "t3", "2026-10-15T00:00:00Z", "PLAN_CHANGED", plan_id="starter")]
    got, expected = _run_in_two_steps(cm_env, tmp_path, first, second, "2026-11")
    assert got == expected
    invoice = got["t3-20261101"]
    assert invoice["plan_id"] == "starter"
    assert "blocked_overage_seconds" not in _lines(invoice)
    assert _lines(invoice)["included_seconds"] == ("200", "0.00")
    assert invoice["total"] == "58.80"


def test_number_provisioned_after_calls_were_rated(cm_env: dict[str, str], tmp_path: Path) -> None:
    first = [
        prov("s1", "t4", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="pro", tax_region="NONE"),
        call("c1", "t4", "2026-11-03T10:00:00Z", 700),
    ]
    second = [
        prov(
            "n1",
            "t4",
            "2026-11-01T00:00:00Z",
            "NUMBER_PROVISIONED",
            number="+15551234567",
            number_type="LOCAL",
        ),
        prov("e1", "t4", "2026-11-02T00:00:00Z", "EMPLOYEE_ACTIVATED", employee_id="emp-1"),
    ]
    got, expected = _run_in_two_steps(cm_env, tmp_path, first, second, "2026-11")
    assert got == expected
    invoice = got["t4-20261101"]
    assert next(line for line in invoice["lines"] if line["code"] == "number")["amount"] == "1.50"
    assert _lines(invoice)["employees_peak"][0] == "1"
    assert _lines(invoice)["overage_seconds"] == ("102", "1.02")


def test_resubscription_consumed_after_a_call_it_covers(cm_env: dict[str, str], tmp_path: Path) -> None:
    """A call in a period that no subscription covered yet waits (parked) instead of being refused."""
    first = [
        prov(
            "s1", "t5", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
        ),
        prov("x", "t5", "2026-10-05T00:00:00Z", "SUBSCRIPTION_CANCELLED"),
        call("c1", "t5", "2026-11-10T10:00:00Z", 300),
    ]
    second = [
        prov("s2", "t5", "2026-11-03T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE")
    ]
    got, expected = _run_in_two_steps(cm_env, tmp_path, first, second, "2026-11")
    assert got == expected
    assert _lines(got["t5-20261101"])["included_seconds"] == ("300", "0.00")


def test_earlier_subscription_start_consumed_last_moves_the_anchor(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    first = [
        prov("s2", "t6", "2026-10-15T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="pro", tax_region="NONE"),
        call("c1", "t6", "2026-10-10T10:00:00Z", 30),
        call("c2", "t6", "2026-11-20T10:00:00Z", 30),
    ]
    second = [
        prov("s1", "t6", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE")
    ]
    got, expected = _run_in_two_steps(cm_env, tmp_path, first, second, "2026-11")
    assert got == expected
    assert got["t6-20261101"]["plan_id"] == "pro"
    assert _lines(got["t6-20261101"])["included_seconds"] == ("60", "0.00")
    callmeter(cm_env, "invoice", "--period", "2026-10", "--out", str(tmp_path / "oct"))
    october = read_invoices(tmp_path / "oct")
    assert {k: comparable(v) for k, v in october.items()} == reference_invoices(
        [tmp_path / "first.jsonl", tmp_path / "second.jsonl"], 2026, 10, example_catalog()
    )
    assert _lines(october["t6-20261001"])["included_seconds"] == ("30", "0.00")


def test_invoice_refuses_a_ledger_the_worker_has_not_finished(cm_env: dict[str, str], tmp_path: Path) -> None:
    sub = prov(
        "s1", "t7", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    callmeter(
        cm_env,
        "produce",
        str(write_events(tmp_path / "a.jsonl", [sub, call("c1", "t7", "2026-11-02T10:00:00Z", 60)])),
    )
    worker_stats(cm_env)
    # A second call reaches Kafka, but no worker consumes it.
    callmeter(
        cm_env,
        "produce",
        str(write_events(tmp_path / "b.jsonl", [call("c2", "t7", "2026-11-03T10:00:00Z", 60)])),
    )
    out = tmp_path / "out"
    refused = callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(out), check=False)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "the ledger is incomplete: 1 partition(s)" in refused.stderr and "calls/" in refused.stderr
    assert not out.exists() or not list(out.iterdir())
    # Drafts anyway, marked incomplete, never final.
    final_refused = callmeter(
        cm_env,
        "invoice",
        "--period",
        "2026-11",
        "--out",
        str(out),
        "--allow-incomplete",
        "--finalize",
        check=False,
    )
    assert final_refused.returncode == 1 and "never made from an incomplete ledger" in final_refused.stderr
    drafts = callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(out), "--allow-incomplete")
    assert "draft incomplete" in drafts.stdout
    draft = read_invoices(out)["t7-20261101"]
    assert draft["incomplete"] is True
    assert _lines(draft)["included_seconds"] == ("60", "0.00")
    worker_stats(cm_env)
    callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(out))
    invoice = read_invoices(out)["t7-20261101"]
    assert "incomplete" not in invoice
    assert _lines(invoice)["included_seconds"] == ("120", "0.00")


def test_finalizing_a_period_that_has_not_ended_is_refused(cm_env: dict[str, str], tmp_path: Path) -> None:
    events = write_events(
        tmp_path / "e.jsonl",
        [
            prov(
                "s1",
                "t8",
                "2026-11-10T00:00:00Z",
                "SUBSCRIPTION_STARTED",
                plan_id="starter",
                tax_region="NONE",
            )
        ],
    )
    callmeter(cm_env, "produce", str(events))
    worker_stats(cm_env)
    env = dict(cm_env, CALLMETER_CLOCK_NOW="2026-11-23T12:00:00Z")
    out = tmp_path / "out"
    refused = callmeter(env, "invoice", "--period", "2026-11", "--out", str(out), "--finalize", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "callmeter: error: cannot finalize t8-20261110: its period runs until 2026-12-10"
    )
    assert not out.exists() or not list(out.iterdir())
    ok = callmeter(env, "invoice", "--period", "2026-11", "--out", str(out))
    assert "draft" in ok.stdout
    assert read_invoices(out)["t8-20261110"]["status"] == "draft"


def test_live_balance_is_corrected_by_a_late_plan_change(cm_env: dict[str, str], tmp_path: Path) -> None:
    first = [
        prov(
            "s1", "t9", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
        ),
        call("c1", "t9", "2026-11-02T10:00:00Z", 600),
        call("c2", "t9", "2026-11-02T11:00:00Z", 59),
    ]
    second = [prov("pc", "t9", "2026-10-20T00:00:00Z", "PLAN_CHANGED", plan_id="pro")]
    callmeter(cm_env, "produce", str(write_events(tmp_path / "a.jsonl", first)))
    worker_stats(cm_env)
    callmeter(cm_env, "produce", str(write_events(tmp_path / "b.jsonl", second)))
    stats = worker_stats(cm_env)
    assert stats["rebalanced"] == 1
    with BackgroundWorker(cm_env) as worker:
        status, body = worker.get("/balances/t9?at=2026-11-15T00:00:00Z")
    assert status == 200
    # pro: 600 s + 59 s rounded up to the 60 s minimum; 600 included, 60 s overage at 0.01.
    assert (body["plan_id"], body["used_seconds"], body["overage_seconds"]) == ("pro", 660, 60)
    assert body["charges_so_far"] == "199.60"
    callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(tmp_path / "out"))
    assert read_invoices(tmp_path / "out")["t9-20261101"]["subtotal"] == body["charges_so_far"]


def test_balances_agree_with_invoices_after_a_state_rebuild(cm_env: dict[str, str], tmp_path: Path) -> None:
    """Every tenant period of a simulated month: the balance's used seconds and charges equal the
    invoice's, after the worker's local state was thrown away and rebuilt from the changelogs."""
    import shutil

    from pipeline.commands.simulate import SimulationConfig, write_file

    events = tmp_path / "sim.jsonl"
    write_file(SimulationConfig(tenants=4, calls=800, duplicate_rate=0.05, seed=3), events)
    callmeter(cm_env, "produce", str(events))
    worker_stats(cm_env)
    shutil.rmtree(Path(cm_env["CALLMETER_DATA_DIR"]) / "worker")
    callmeter(cm_env, "invoice", "--period", "2026-10", "--out", str(tmp_path / "out"))
    invoices = read_invoices(tmp_path / "out")
    assert len(invoices) == 4
    with BackgroundWorker(cm_env) as worker:
        for invoice in invoices.values():
            at = f"{invoice['period_start']}T12:00:00Z"
            status, body = worker.get(f"/balances/{invoice['tenant_id']}?at={at}")
            assert status == 200, body
            seconds = sum(
                int(line["quantity"])
                for line in invoice["lines"]
                if line["code"] in ("included_seconds", "overage_seconds", "blocked_overage_seconds")
            )
            assert body["used_seconds"] == seconds, invoice["invoice_id"]
            assert body["charges_so_far"] == invoice["subtotal"], invoice["invoice_id"]
