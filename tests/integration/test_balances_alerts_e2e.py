"""Live balances from the worker's HTTP API and usage alerts exactly once."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from confluent_kafka import Consumer

from pipeline.settings import Settings
from schemas.serde import Serde
from tests.conftest import free_port
from tests.integration.cli import BackgroundWorker, callmeter, worker_stats
from tests.integration.eventfiles import prov

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subscription(tenant: str, plan: str, event_id: str = "sub") -> dict[str, Any]:
    return {
        "type": "provisioning",
        "event_id": f"{tenant}-{event_id}",
        "tenant_id": tenant,
        "occurred_at": "2026-11-01T00:00:00Z",
        "action": "SUBSCRIPTION_STARTED",
        "plan_id": plan,
        "tax_region": "NONE",
        "number": None,
        "number_type": None,
        "employee_id": None,
    }


def call(tenant: str, event_id: str, seconds: int, start: datetime = T0) -> dict[str, Any]:
    return {
        "type": "call",
        "event_id": event_id,
        "tenant_id": tenant,
        "call_id": event_id,
        "employee_id": None,
        "direction": "INBOUND",
        "from_number": "+15550000001",
        "to_number": "+15551110001",
        "started_at": _iso(start),
        "answered_at": _iso(start),
        "ended_at": _iso(start + timedelta(seconds=seconds)),
        "disposition": "ANSWERED",
        "gateway_id": "gw-1",
    }


def write(path: Path, events: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return str(path)


def read_alerts(env: dict[str, str]) -> list[dict[str, Any]]:
    settings = Settings(topic_prefix=env["CALLMETER_TOPIC_PREFIX"], partitions=3)
    consumer = Consumer(
        {
            "bootstrap.servers": env["CALLMETER_KAFKA"],
            "group.id": f"alerts-test-{uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([settings.topics.alerts])
    serde, out, idle = Serde(), [], 0
    while idle < 6:
        msg = consumer.poll(0.5)
        if msg is None:
            idle += 1
        elif msg.error() is None:
            out.append(serde.decode(msg.value())[1])
    consumer.close()
    return out


def test_threshold_alerts_exactly_once_across_duplicates_and_restart(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    # starter: 18000 s included. 13500 s = 75 %, +2700 = 16200 s = 90 %, +1800 = 18000 s = 100 %.
    crossing = call("tau", "c3", 1800, T0 + timedelta(days=2))
    events = [
        subscription("tau", "starter"),
        call("tau", "c1", 13500),
        call("tau", "c2", 2700, T0 + timedelta(days=1)),
        crossing,
        call("tau", "c4", 60, T0 + timedelta(days=3)),
    ]
    callmeter(cm_env, "produce", write(tmp_path / "a.jsonl", events))
    worker_stats(cm_env)
    alerts = read_alerts(cm_env)
    # c1's rate (13500 s in 36.75 h) would use up the rest 12.25 h later: a projected-overage alert
    # , sent once, with the crossing alert of the same call.
    assert [
        (a["kind"], a["threshold_percent"], a["used_seconds"], a["included_seconds"]) for a in alerts
    ] == [
        ("USAGE_THRESHOLD", 75, 13500, 18000),
        ("PROJECTED_OVERAGE", None, 13500, 18000),
        ("USAGE_THRESHOLD", 90, 16200, 18000),
        ("USAGE_THRESHOLD", 100, 18000, 18000),
    ]
    assert {a["alert_id"] for a in alerts} == {
        *(f"tau-20261101-USAGE_THRESHOLD-{p}" for p in (75, 90, 100)),
        "tau-20261101-PROJECTED_OVERAGE-call_seconds",
    }
    # Each carries resource, usage, allowance and the projected exhaustion date at its crossing.
    assert [(a["resource"], a["usage"], a["allowance"], a["projected_exhaustion_date"]) for a in alerts] == [
        ("call_seconds", 13500, 18000, date(2026, 11, 3)),
        ("call_seconds", 13500, 18000, date(2026, 11, 3)),
        ("call_seconds", 16200, 18000, date(2026, 11, 3)),
        ("call_seconds", 18000, 18000, None),
    ]
    # A gateway retry of the crossing call, and a restart of the worker: still exactly four.
    callmeter(cm_env, "produce", write(tmp_path / "b.jsonl", [crossing]))
    stats = worker_stats(cm_env)
    assert stats["duplicates"] == {"call": 1}
    assert len(read_alerts(cm_env)) == 4
    # Each alert carries the event time of its crossing: the end of the call that crossed it.
    assert [a["crossed_at"] for a in alerts] == [
        T0 + timedelta(seconds=13500),
        T0 + timedelta(seconds=13500),
        T0 + timedelta(days=1, seconds=2700),
        T0 + timedelta(days=2, seconds=1800),
    ]
    tau = "tau              period 2026-11-01"
    assert callmeter(cm_env, "alerts").stdout.splitlines() == [
        f"2026-11-02 12:45:00Z  {tau}  projected to use up the included seconds on 2026-11-03 "
        "(13500/18000 so far)",
        f"2026-11-02 12:45:00Z  {tau}   75 % of included seconds used (13500/18000)",
        f"2026-11-03 09:45:00Z  {tau}   90 % of included seconds used (16200/18000)",
        f"2026-11-04 09:30:00Z  {tau}  100 % of included seconds used (18000/18000)",
    ]


def test_block_plan_disallows_exactly_when_the_allowance_is_used(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    # hardstop: 120 s included, overage: block.
    at = "?at=2026-11-20T00:00:00Z"
    callmeter(cm_env, "produce", write(tmp_path / "s.jsonl", [subscription("dot", "hardstop")]))
    with BackgroundWorker(cm_env) as worker:
        worker.wait_for(lambda s: s["stats"]["consumed"].get("provisioning") == 1, "subscription")
        status, body = worker.get(f"/balances/dot{at}")
        assert status == 200
        assert (body["used_seconds"], body["remaining_seconds"], body["allowed"]) == (0, 120, True)
        expected = [
            (60, 60, True, "19.00"),
            (119, 1, True, "19.00"),
            (120, 0, False, "19.00"),
            (150, 0, False, "19.00"),
        ]
        for i, (seconds, (used, remaining, allowed, charges)) in enumerate(
            zip([60, 59, 1, 30], expected, strict=True)
        ):
            callmeter(
                cm_env,
                "produce",
                write(tmp_path / f"c{i}.jsonl", [call("dot", f"d{i}", seconds, T0 + timedelta(hours=i))]),
            )
            worker.wait_for(lambda s, n=i + 1: s["stats"]["rated"] == n, f"call {i} rated")
            status, body = worker.get(f"/balances/dot{at}")
            assert (
                body["used_seconds"],
                body["remaining_seconds"],
                body["allowed"],
                body["charges_so_far"],
            ) == (used, remaining, allowed, charges)
            assert body["overage_mode"] == "block"
            assert body["overage_seconds"] == max(used - 120, 0)
        status, body = worker.get("/balances/nobody")
        assert status == 404 and body == {"error": "unknown tenant", "tenant_id": "nobody"}
        out = callmeter(dict(cm_env), "balance", "dot", "--at", "2026-11-20T00:00:00Z").stdout
        assert json.loads(out)["allowed"] is False
        proc = callmeter(cm_env, "balance", "nobody", check=False)
        assert proc.returncode == 1 and "unknown tenant" in proc.stderr


def test_projected_exhaustion_date(cm_env: dict[str, str], tmp_path: Path) -> None:
    # starter, 18000 s included; 6000 s used in the first 4 days (1500 s/day): 12000 s left = 8 more days.
    callmeter(
        cm_env,
        "produce",
        write(
            tmp_path / "e.jsonl",
            [subscription("rho", "starter"), call("rho", "r1", 6000, datetime(2026, 11, 1, 12, tzinfo=UTC))],
        ),
    )
    with BackgroundWorker(cm_env) as worker:
        worker.wait_for(lambda s: s["stats"]["rated"] == 1, "rated")
        _status, body = worker.get("/balances/rho?at=2026-11-05T00:00:00Z")
        assert body["projected_exhaustion_date"] == "2026-11-13"
        _status, body = worker.get("/balances/rho?at=2026-11-29T00:00:00Z")
        assert body["projected_exhaustion_date"] is None  # at that pace it lasts past the period end


def test_two_workers_answer_every_tenant_from_either_port(cm_env: dict[str, str], tmp_path: Path) -> None:
    env_a = dict(cm_env, CALLMETER_PARTITIONS="6", CALLMETER_DATA_DIR=str(tmp_path / "a"))
    env_b = dict(env_a, CALLMETER_DATA_DIR=str(tmp_path / "b"), CALLMETER_WORKER_WEB_PORT=str(free_port()))
    tenants = [f"tn{i}" for i in range(12)]
    events = [subscription(t, "starter") for t in tenants]
    events += [call(t, f"{t}-c", 100 * (i + 1)) for i, t in enumerate(tenants)]
    callmeter(env_a, "produce", write(tmp_path / "m.jsonl", events))
    with BackgroundWorker(env_a) as a, BackgroundWorker(env_b) as b:

        def settled() -> bool:
            try:
                return all(
                    w.get(f"/balances/{t}?at=2026-11-20T00:00:00Z")[1].get("used_seconds") == 100 * (i + 1)
                    for w in (a, b)
                    for i, t in enumerate(tenants)
                )
            except (OSError, ValueError):
                return False

        a.wait_for(lambda _s: settled(), "both workers answering for every tenant", timeout=180)
        for i, t in enumerate(tenants):
            for w in (a, b):
                status, body = w.get(f"/balances/{t}?at=2026-11-20T00:00:00Z")
                assert status == 200
                assert (body["tenant_id"], body["used_seconds"], body["remaining_seconds"]) == (
                    t,
                    100 * (i + 1),
                    18000 - 100 * (i + 1),
                )
                # Authorization and quota are forwarded to the owner the same way.
                assert w.get(f"/authorize/{t}?at=2026-11-20T00:00:00Z")[1]["plan_id"] == "starter"
                assert w.get(f"/quota/{t}?at=2026-11-20T00:00:00Z")[1]["employees"]["limit"] == 5
        owned = [set(w.status()["assigned_calls_partitions"]) for w in (a, b)]
        # Both own some partitions, so half the answers above were forwarded to the other worker.
        assert owned[0] and owned[1] and owned[0] | owned[1] == set(range(6)) and not owned[0] & owned[1]


def provisioning(tenant: str, event_id: str, action: str, at: str, **fields: str) -> dict[str, Any]:
    return prov(event_id, tenant, at, action, **fields)


def test_quota_exceeded_once_per_tenant_period_and_kind(cm_env: dict[str, str], tmp_path: Path) -> None:
    # hardstop allows 1 number and 2 active employees.
    events = [
        subscription("qq", "hardstop"),
        provisioning(
            "qq", "n1", "NUMBER_PROVISIONED", "2026-11-02T00:00:00Z", number="+15550001", number_type="LOCAL"
        ),
        provisioning(
            "qq", "n2", "NUMBER_PROVISIONED", "2026-11-03T00:00:00Z", number="+15550002", number_type="LOCAL"
        ),
        provisioning(
            "qq", "n3", "NUMBER_PROVISIONED", "2026-11-04T00:00:00Z", number="+15550003", number_type="LOCAL"
        ),
        *[
            provisioning(
                "qq", f"e{i}", "EMPLOYEE_ACTIVATED", f"2026-11-0{i + 2}T12:00:00Z", employee_id=f"emp-{i}"
            )
            for i in range(3)
        ],
    ]
    callmeter(cm_env, "produce", write(tmp_path / "q.jsonl", events))
    worker_stats(cm_env)
    quota = [a for a in read_alerts(cm_env) if a["kind"] == "QUOTA_EXCEEDED"]
    assert sorted((a["used_seconds"], a["included_seconds"], a["message"].split()[4]) for a in quota) == [
        (2, 1, "numbers;"),
        (3, 2, "employees;"),
    ]  # the first number over the limit; the third employee
    assert {a["alert_id"] for a in quota} == {
        "qq-20261101-QUOTA_EXCEEDED-numbers",
        "qq-20261101-QUOTA_EXCEEDED-employees",
    }
