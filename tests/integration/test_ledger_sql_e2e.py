"""`callmeter sql` and the analyst views, against a ledger filled by the real pipeline.

Every ready query of docs/ledger.md runs through `callmeter sql --format json` and its result is
compared with rating/'s batch computation on the same events (two months, three tenants on three
plans, duplicates and a bad record), computed here without the ledger.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pipeline.commands.cli import load_catalog
from pipeline.settings import SAMPLE_CATALOG
from rating.batch import dedupe, invoices_for_month, timelines_from
from rating.calls import RatedCall, rate_call
from tests.integration.cli import BackgroundWorker, callmeter, reference_events
from tests.integration.eventfiles import call, prov, write_events

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TENANTS = {
    "acme": ("starter", "NONE", datetime(2026, 9, 1, tzinfo=UTC)),
    "globex": ("pro", "US-NY", datetime(2026, 9, 10, tzinfo=UTC)),
    "initech": ("hardstop", "GB", datetime(2026, 9, 20, tzinfo=UTC)),
}


def doc_queries() -> dict[str, str]:
    text = (ROOT / "docs" / "ledger.md").read_text()
    return dict(re.findall(r"### (Q\d+)\. [^\n]*\n\n```sql\n(.*?)```", text, flags=re.DOTALL))


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def _events(path: Path) -> Path:
    rng = random.Random(2026)
    events: list[dict[str, Any]] = []
    end = datetime(2026, 11, 1, tzinfo=UTC)
    for tenant, (plan, tax, start) in TENANTS.items():
        events.append(
            prov(f"{tenant}-sub", tenant, _iso(start), "SUBSCRIPTION_STARTED", plan_id=plan, tax_region=tax)
        )
        events.append(prov(f"{tenant}-e1", tenant, _iso(start), "EMPLOYEE_ACTIVATED", employee_id="e1"))
        for i in range(60):
            at = start + timedelta(seconds=rng.randrange(int((end - start).total_seconds()) - 7200))
            event = call(
                f"{tenant}-c{i:03d}", tenant, _iso(at), rng.choice([15, 45, 90, 300, 700, 1500]), "e1"
            )
            event["gateway_id"] = rng.choice(["gw-east", "gw-west"])
            events.append(event)
    events += [dict(e) for e in rng.sample([e for e in events if e["type"] == "call"], 8)]  # resends
    bad = call("acme-bad", "acme", "2026-10-03T10:00:00Z", 60)
    bad["ended_at"] = bad["started_at"]  # ended before it was answered: a dead letter
    events.append(bad)
    rng.shuffle(events)
    return write_events(path, events)


def _expected(events: Path) -> dict[str, list[dict[str, Any]]]:
    """Each doc query's answer, from rating/'s batch computation on the events."""
    calls, provisioning = reference_events(events)
    catalog = load_catalog(SAMPLE_CATALOG)
    timelines = timelines_from(provisioning)
    rated = [
        r for c in dedupe(calls) if isinstance(r := rate_call(c, timelines[c.tenant_id], catalog), RatedCall)
    ]
    invoices = {m: invoices_for_month(calls, provisioning, catalog, 2026, m) for m in (9, 10)}
    lines: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    status = {}
    for month, batch in invoices.items():
        for inv in batch:
            key = (inv.tenant_id, inv.period.start_date.isoformat())
            status[key] = "final" if month == 9 else "draft"
            for line in inv.lines:
                lines[key][line.code] += int(Decimal(line.quantity))
    usage: dict[tuple[str, str], list[RatedCall]] = defaultdict(list)
    for r in rated:
        usage[(r.call.tenant_id, r.period.start_date.isoformat())].append(r)
    q1: list[dict[str, Any]] = [
        {
            "tenant_id": t, "period": p, "plan_id": rs[0].plan_id, "calls": len(rs),
            "billable_seconds": sum(r.billable_seconds for r in rs),
            "overage_seconds": lines[(t, p)]["overage_seconds"],
            "blocked_seconds": lines[(t, p)]["blocked_overage_seconds"], "invoice_status": status[(t, p)],
        }
        for (t, p), rs in sorted(usage.items())
    ]  # fmt: skip
    q2: list[dict[str, Any]] = []
    previous: dict[str, int] = {}
    for row in q1:
        before = previous.get(row["tenant_id"], 0)
        change = row["billable_seconds"] - before
        q2.append({k: row[k] for k in ("tenant_id", "period", "billable_seconds")})
        q2[-1].update(previous_billable_seconds=before, change_seconds=change)
        previous[row["tenant_id"]] = row["billable_seconds"]
    october = [r for r in q1 if r["period"].startswith("2026-10")]
    q3 = sorted(
        ({"tenant_id": r["tenant_id"], "overage_seconds": r["overage_seconds"],
          "blocked_seconds": r["blocked_seconds"]} for r in october),
        key=lambda r: (-r["overage_seconds"], -r["blocked_seconds"], r["tenant_id"]),
    )  # fmt: skip
    days: dict[str, list[RatedCall]] = defaultdict(list)
    for r in rated:
        day = r.call.started_at.date().isoformat()
        if r.call.tenant_id == "acme" and "2026-10-01" <= day <= "2026-10-07":
            days[day].append(r)
    q4 = [
        {"day": d, "calls": len(rs), "billable_seconds": sum(r.billable_seconds for r in rs)}
        for d, rs in sorted(days.items())
    ]
    money: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for inv in invoices[9]:
        money[(inv.period.start_date.isoformat(), inv.plan_id)].append(inv)
    q5 = [
        {"period": p, "plan_id": plan, "invoices": len(invs), "subtotal": str(sum(i.subtotal for i in invs)),
         "tax": str(sum(i.tax for i in invs)), "total": str(sum(i.total for i in invs))}
        for (p, plan), invs in sorted(money.items())
    ]  # fmt: skip
    per_tenant: dict[str, list[Any]] = defaultdict(list)
    for inv in invoices[9] + invoices[10]:
        per_tenant[inv.tenant_id].append(inv)
    q6 = [
        {"tenant_id": t, "invoices": len(invs), "subtotal": str(sum(i.subtotal for i in invs)),
         "tax": str(sum(i.tax for i in invs)), "total": str(sum(i.total for i in invs))}
        for t, invs in sorted(per_tenant.items())
    ]  # fmt: skip
    longest = sorted(usage[("globex", "2026-10-10")], key=lambda r: (-r.billable_seconds, r.call.event_id))
    q7 = [
        {"event_id": r.call.event_id, "employee_id": r.call.employee_id,
         "started_at": r.call.started_at.isoformat(), "billable_seconds": r.billable_seconds}
        for r in longest[:5]
    ]  # fmt: skip
    gateways: dict[str, list[RatedCall]] = defaultdict(list)
    hours: dict[int, list[RatedCall]] = defaultdict(list)
    for r in rated:
        gateways[r.call.gateway_id].append(r)
        if r.call.tenant_id == "initech":
            hours[r.call.started_at.hour].append(r)
    q8 = [
        {"gateway_id": g, "calls": len(rs), "billable_seconds": sum(r.billable_seconds for r in rs)}
        for g, rs in sorted(gateways.items())
    ]
    q9 = [
        {"hour": h, "calls": len(rs), "billable_seconds": sum(r.billable_seconds for r in rs)}
        for h, rs in sorted(hours.items(), key=lambda item: (-len(item[1]), item[0]))[:3]
    ]
    q10 = [{"reason": "ENDED_BEFORE_ANSWERED", "gateway_id": "gw-1", "dead_letters": 1}]
    # Every resend is a copy of a call first seen earlier: the worker finds it, whatever the order.
    sent = Counter(c.gateway_id for c in calls)
    unique = Counter(c.gateway_id for c in dedupe(calls))
    billed = {g: len(rs) for g, rs in gateways.items()}
    q12 = [
        {"gateway_id": g, "calls": n, "duplicates": sent[g] - unique[g],
         "duplicate_rate": round((sent[g] - unique[g]) / (n + sent[g] - unique[g]), 4)}
        for g, n in sorted(billed.items())
    ]  # fmt: skip
    return {"Q1": q1, "Q2": q2, "Q3": q3, "Q4": q4, "Q5": q5, "Q6": q6, "Q7": q7, "Q8": q8, "Q9": q9,
            "Q10": q10, "Q11": [], "Q12": q12, "Q13": []}  # fmt: skip


_GRAFANA_MACROS = {
    # The ClickHouse plugin's macros, with the dashboard's range set to cover the test months.
    r"\$__timeFilter\((\w+)\)": r"\1 >= toDateTime64('2026-01-01 00:00:00', 3, 'UTC') AND "
    r"\1 < toDateTime64('2027-01-01 00:00:00', 3, 'UTC')",
    r"\$__fromTime": "toDateTime('2026-01-01 00:00:00', 'UTC')",
    r"\$__toTime": "toDateTime('2027-01-01 00:00:00', 'UTC')",
}


def finance_panels() -> dict[str, str]:
    """Every query of the finance dashboard (deploy/grafana/finance.json), macros expanded."""
    board = json.loads((ROOT / "deploy" / "grafana" / "finance.json").read_text())
    panels = {}
    for panel in board["panels"]:
        (target,) = panel["targets"]
        query = target["rawSql"]
        for macro, value in _GRAFANA_MACROS.items():
            query = re.sub(macro, value, query)
        assert "$" not in query, query
        panels[panel["title"]] = query
    return panels


def _reference_invoices(events: Path, month: int) -> list[Any]:
    calls, provisioning = reference_events(events)
    return invoices_for_month(calls, provisioning, load_catalog(SAMPLE_CATALOG), 2026, month)


def sql(env: dict[str, str], query: str) -> list[dict[str, Any]]:
    return list(json.loads(callmeter(env, "sql", query, "--format", "json").stdout))


def test_the_docs_ready_queries_answer_what_the_batch_computation_says(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    events = _events(tmp_path / "events.jsonl")
    callmeter(cm_env, "produce", str(events))
    callmeter(cm_env, "worker", "--until-idle")
    callmeter(cm_env, "invoice", "--period", "2026-09", "--out", str(tmp_path / "sep"), "--finalize")
    callmeter(cm_env, "invoice", "--period", "2026-10", "--out", str(tmp_path / "oct"))
    expected = _expected(events)
    queries = doc_queries()
    assert sorted(queries, key=lambda q: int(q[1:])) == [f"Q{i}" for i in range(1, 14)]
    assert expected["Q4"] and expected["Q7"] and any(r["overage_seconds"] for r in expected["Q3"])
    assert sum(r["duplicates"] for r in expected["Q12"]) == 8
    for name, query in queries.items():
        assert sql(cm_env, query) == expected[name], name

    # The finance dashboard's panels read the same views and answer the same figures.
    panels = {title: sql(cm_env, query) for title, query in finance_panels().items()}
    invoices = _reference_invoices(events, 9) + _reference_invoices(events, 10)
    revenue = panels["Revenue by plan and period (invoiced, tax included)"]
    assert sum(Decimal(r["total"]) for r in revenue) == sum(i.total for i in invoices)
    hours = sum(Decimal(str(r["billable_hours"])) for r in panels["Billable hours per day by plan"])
    assert round(hours * 3600) == sum(r["billable_seconds"] for r in expected["Q1"])
    by_gateway = sorted(panels["Duplicate rate per gateway"], key=lambda r: r["gateway_id"])
    assert by_gateway == expected["Q12"]
    assert panels["Dead letters by reason and gateway"][0]["dead_letters"] == 1
    assert panels["Adjustments per month"] == []
    by_status: Counter[str] = Counter()
    for row in panels["Final vs draft invoices by period"]:  # one row per period start and status
        by_status[row["status"]] += int(row["invoices"])
    assert by_status == {
        "final": len(_reference_invoices(events, 9)),
        "draft": len(_reference_invoices(events, 10)),
    }
    assert [title for title, rows in panels.items() if not rows] == ["Adjustments per month"]

    # The usage review of a tenant's October period (ended: its own forecast), against rating/.
    review = json.loads(callmeter(cm_env, "usage", "acme", "--period", "2026-10", "--json").stdout)
    october, september = (next(r for r in expected["Q1"] if r["tenant_id"] == "acme" and r["period"] == p)
                          for p in ("2026-10-01", "2026-09-01"))  # fmt: skip
    invoice = next(i for i in _reference_invoices(events, 10) if i.tenant_id == "acme")
    assert review["period"]["billable_seconds"] == october["billable_seconds"]
    assert review["period"]["forecast_billable_seconds"] == october["billable_seconds"]
    assert review["period"]["overage_seconds_so_far"] == october["overage_seconds"]
    assert (review["period"]["subtotal_so_far"], review["period"]["total_so_far"]) == (
        str(invoice.subtotal),
        str(invoice.total),
    )
    assert review["previous_period"]["billable_seconds"] == september["billable_seconds"]
    assert review["top_employees"] == [
        {"employee": "e1", "calls": october["calls"], "billable": october["billable_seconds"]}
    ]
    assert sum(int(d["billable"]) for d in review["daily"]) == october["billable_seconds"]
    crossed = [t for t in (75, 90, 100) if october["billable_seconds"] * 100 >= t * 18000]
    usage_alerts = [a for a in review["alerts"] if a["kind"] == "USAGE_THRESHOLD"]
    assert [a["threshold_percent"] for a in usage_alerts] == crossed
    # Mid-period (the clock set to 20 October): a linear forecast to the period's end.
    midway = dict(cm_env, CALLMETER_CLOCK_NOW="2026-10-20T00:00:00Z")
    review = json.loads(callmeter(midway, "usage", "acme", "--json").stdout)
    assert review["period"]["start"] == "2026-10-01T00:00:00+00:00"
    assert review["period"]["forecast_billable_seconds"] == round(october["billable_seconds"] * 31 / 19)
    text = callmeter(midway, "usage", "acme").stdout
    assert "usage of acme: period 2026-10-01 to 2026-11-01 (plan starter, 61.3 % elapsed)" in text, text

    # Read-only, refused by ClickHouse itself, one line, nothing changed.
    before = sql(cm_env, "SELECT count() AS n FROM rated_calls")
    for statement in (
        "DROP TABLE rated_calls",
        "INSERT INTO dead_letters (reason) VALUES ('x')",
        "SET readonly = 0",
    ):
        proc = callmeter(cm_env, "sql", statement, check=False)
        assert proc.returncode == 1, statement
        assert proc.stderr.count("\n") == 1 and "refused: the ledger is read-only" in proc.stderr, proc.stderr
    assert sql(cm_env, "SELECT count() AS n FROM rated_calls") == before

    # While a worker holds the embedded ledger, the query is served through it, read-only as well.
    announced = Path(cm_env["CALLMETER_DATA_DIR"]) / "clickhouse.query.json"
    with BackgroundWorker(cm_env) as worker:  # returns once the worker is ready: its sink holds the ledger
        assert worker.proc is not None
        assert json.loads(announced.read_text())["pid"] != worker.proc.pid  # the worker's child holds it
        assert sql(cm_env, queries["Q8"]) == expected["Q8"]
        proc = callmeter(cm_env, "sql", "DROP TABLE rated_calls", check=False)
        assert proc.returncode == 1 and "refused: the ledger is read-only" in proc.stderr, proc.stderr
    assert not announced.exists()
    assert sql(cm_env, "SELECT count() AS n FROM rated_calls") == before
