"""Usage alert thresholds per tenant (provisioning event), per plan and per catalog, and the
projected-overage alert, through the real broker and worker, exactly once across resends and a restart."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.settings import SAMPLE_CATALOG
from tests.integration.cli import callmeter, worker_stats
from tests.integration.eventfiles import prov
from tests.integration.test_balances_alerts_e2e import call, read_alerts, subscription, write

pytestmark = pytest.mark.integration

NOV2 = datetime(2026, 11, 2, tzinfo=UTC)


def thresholds(tenant: str, event_id: str, at: str, values: list[int]) -> dict[str, Any]:
    event = prov(f"{tenant}-{event_id}", tenant, at, "ALERT_THRESHOLDS_SET")
    event["alert_thresholds_percent"] = values
    return event


def test_thresholds_per_tenant_plan_and_catalog_and_one_projected_alert(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    # The catalog's default is 80 %; starter's own is 50/100 %; pro has none (so 80 %).
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        SAMPLE_CATALOG.read_text().replace(
            "employees: {max_active: 5}",
            "employees: {max_active: 5}\n        alert_thresholds_percent: [100, 50]",
        )
        + "alert_thresholds_percent: [80]\n"
    )
    env = dict(cm_env, CALLMETER_CATALOG=str(catalog))
    late = NOV2 + timedelta(days=20)  # late in the period: these rates project no overage
    projecting = call("pp", "pp1", 1200, NOV2)  # 1800 s by 2 Nov 00:20, the first day's 600 s included
    crossing = call("aa", "aa2", 8100, late + timedelta(hours=3))
    events = [
        # own thresholds: the later setting (event time) wins, whichever arrives first
        thresholds("aa", "t2", "2026-11-01T12:00:00Z", [95, 50]),
        subscription("aa", "starter"),
        thresholds("aa", "t1", "2026-11-01T06:00:00Z", [75]),
        subscription("bb", "starter"),  # the plan's
        subscription("cc", "pro"),  # the catalog's
        subscription("dd", "starter"),
        thresholds("dd", "bad", "2026-11-01T06:00:00Z", [0, 101]),  # refused: dd keeps its plan's
        *[call(t, f"{t}1", 9000, late) for t in ("aa", "bb", "dd")],  # 50 %
        crossing,  # 95 %
        *[call(t, f"{t}2", 8100, late + timedelta(hours=3)) for t in ("bb", "dd")],
        call("cc", "cc1", 480, late),  # 80 % of pro's 600 s
        # projected: 600 s in the first day tells nothing yet (less than a day of rate) ...
        subscription("pp", "starter"),
        call("pp", "pp0", 600, datetime(2026, 11, 1, 10, tzinfo=UTC)),
        # ... 1800 s in 24 h 20 min runs out 219 h later, 11 Nov 03:20; the next call changes nothing
        projecting,
        call("pp", "pp2", 1800, NOV2 + timedelta(days=1)),
    ]
    callmeter(env, "produce", write(tmp_path / "a.jsonl", events))
    stats = worker_stats(env)
    assert stats["dead_letters"] == {"INVALID_EVENT": 1}
    alerts = read_alerts(env)
    crossed = sorted(
        (a["tenant_id"], a["threshold_percent"]) for a in alerts if a["kind"] == "USAGE_THRESHOLD"
    )
    assert crossed == [("aa", 50), ("aa", 95), ("bb", 50), ("cc", 80), ("dd", 50)]
    by_id = {a["alert_id"]: a for a in alerts}
    aa95 = by_id["aa-20261101-USAGE_THRESHOLD-95"]
    assert (aa95["resource"], aa95["usage"], aa95["allowance"]) == ("call_seconds", 17100, 18000)
    assert by_id["cc-20261101-USAGE_THRESHOLD-80"]["usage"] == 480
    # 17100 s (480 s on pro) by 22 Nov runs out before the period ends: one each, and pp's.
    projected = [a for a in alerts if a["kind"] == "PROJECTED_OVERAGE"]
    assert sorted(a["alert_id"] for a in projected) == [
        f"{t}-20261101-PROJECTED_OVERAGE-call_seconds" for t in ("aa", "bb", "cc", "dd", "pp")
    ]
    pp = next(a for a in projected if a["tenant_id"] == "pp")
    assert (
        pp["resource"],
        pp["usage"],
        pp["allowance"],
        pp["projected_exhaustion_date"],
        pp["crossed_at"],
    ) == (
        "call_seconds",
        1800,
        18000,
        date(2026, 11, 11),
        NOV2 + timedelta(seconds=1200),
    )
    assert pp["threshold_percent"] is None
    assert pp["message"] == (
        "pp is projected to use up its 18000 included seconds on 2026-11-11 (1800 used by 2026-11-02) "
        "in the period starting 2026-11-01"
    )

    # A resend of the projecting call and of a crossing one, and a restart: nothing is sent twice. A
    # new list for bb mid-period: 90 % was passed before it existed and is not sent retroactively;
    # the next call crossing 99 % (17820 s) sends that one.
    more = [
        projecting,
        crossing,
        thresholds("bb", "t3", "2026-11-23T00:00:00Z", [90, 99]),
        call("bb", "bb3", 800, late + timedelta(days=2)),
    ]
    callmeter(env, "produce", write(tmp_path / "b.jsonl", more))
    assert worker_stats(env)["duplicates"] == {"call": 2}
    new = [a for a in read_alerts(env) if a["alert_id"] not in by_id]
    assert [(a["alert_id"], a["usage"]) for a in new] == [("bb-20261101-USAGE_THRESHOLD-99", 17900)]
