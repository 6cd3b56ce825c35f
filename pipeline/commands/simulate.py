"""`callmeter simulate`: realistic, reproducible gateway traffic for demos and load tests.

Tenants get a plan, an anchor day, numbers and AI employees; calls follow a log-normal length
distribution (median ~90 s) with a realistic share of unanswered ones. Gateways retry (exact duplicate
records), deliver out of order and late, and occasionally send records that cannot be rated. One
tenant's subscription is published after some of its calls, to exercise parking.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from rating.periods import Period, period_starting_in

PLANS = ("starter", "pro", "hardstop")
DISPOSITIONS_UNANSWERED = ("NO_ANSWER", "BUSY", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class SimulationConfig:
    tenants: int = 5
    calls: int = 2000
    year: int = 2026
    month: int = 10
    duplicate_rate: float = 0.02
    late_rate: float = 0.01
    invalid_rate: float = 0.002
    seed: int = 1
    plans: tuple[str, ...] = PLANS
    # Simulated gateways report finished calls only: a call that would end after this instant has not
    # happened yet and is left out (a month in progress gets its calls so far). None: every call.
    now: datetime | None = None


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _provisioning(tenant: str, event_id: str, at: datetime, action: str, **extra: Any) -> dict[str, Any]:
    event = {
        "type": "provisioning",
        "event_id": event_id,
        "tenant_id": tenant,
        "occurred_at": _iso(at),
        "action": action,
        "plan_id": None,
        "tax_region": None,
        "number": None,
        "number_type": None,
        "employee_id": None,
    }
    event.update(extra)
    return event


@dataclass
class _Tenant:
    tenant_id: str
    plan_id: str
    anchor: int
    period: Period
    provisioning: list[dict[str, Any]]
    numbers: list[str]
    employees: list[str]


def run_tag(cfg: SimulationConfig) -> str:
    """Part of every event id: two runs for another month or seed never reuse an id (issue 9: a reused
    id with another payload is a different event that deduplication would wrongly drop)."""
    return f"{cfg.year}{cfg.month:02d}s{cfg.seed}"


def _tenants(cfg: SimulationConfig, rng: random.Random) -> list[_Tenant]:
    run = run_tag(cfg)
    regions = ("US-NY", "GB", "NONE")
    anchors = (1, 15, 31, 8, 22, 29)
    out = []
    for i in range(cfg.tenants):
        tenant = f"tenant-{i + 1:04d}"
        anchor = anchors[i % len(anchors)]
        period = period_starting_in(anchor, cfg.year, cfg.month)
        # Subscribed one month before the simulated period, on the anchor day.
        start = period_starting_in(anchor, cfg.year - (cfg.month == 1), (cfg.month - 2) % 12 + 1).start
        subscribed = start + timedelta(hours=9)
        plan = cfg.plans[i % len(cfg.plans)]
        events = [
            _provisioning(
                tenant,
                f"{tenant}-{run}-sub",
                subscribed,
                "SUBSCRIPTION_STARTED",
                plan_id=plan,
                tax_region=regions[i % len(regions)],
            )
        ]
        numbers = []
        for n in range(1 + i % 3):
            number = f"+1555{i:03d}{n:04d}"
            numbers.append(number)
            # The last number arrives in the middle of the simulated period: pro-rated.
            at = (
                subscribed + timedelta(hours=1 + n)
                if n < i % 3
                else period.start + timedelta(days=9, hours=3)
            )
            events.append(
                _provisioning(
                    tenant,
                    f"{tenant}-{run}-num-{n}",
                    at,
                    "NUMBER_PROVISIONED",
                    number=number,
                    number_type="TOLL_FREE" if n == 1 else "LOCAL",
                )
            )
        employees = []
        for e in range(1 + i % 4):
            employee = f"{tenant}-emp-{e}"
            employees.append(employee)
            events.append(
                _provisioning(
                    tenant,
                    f"{tenant}-{run}-emp-{e}-on",
                    subscribed + timedelta(days=e),
                    "EMPLOYEE_ACTIVATED",
                    employee_id=employee,
                )
            )
        out.append(_Tenant(tenant, plan, anchor, period, events, numbers, employees))
    return out


def _call(tenant: _Tenant, seq: int, rng: random.Random, run: str) -> dict[str, Any]:
    span = (tenant.period.end - tenant.period.start).total_seconds()
    started = tenant.period.start + timedelta(seconds=rng.uniform(0, span - 7200))
    answered = rng.random() < 0.85
    if answered:
        setup_ms = rng.randint(500, 8000)
        length_s = min(rng.lognormvariate(math.log(90), 0.9), 3 * 3600)
        connected = started + timedelta(milliseconds=setup_ms)
        answered_at: datetime | None = connected
        ended = connected + timedelta(milliseconds=round(length_s * 1000))
        disposition = "ANSWERED"
    else:
        answered_at = None
        ended = started + timedelta(seconds=rng.randint(5, 40))
        disposition = rng.choice(DISPOSITIONS_UNANSWERED)
    number = rng.choice(tenant.numbers)
    inbound = rng.random() < 0.7
    caller = f"+1{rng.randint(200, 999)}{rng.randint(1000000, 9999999)}"
    return {
        "type": "call",
        "event_id": f"{tenant.tenant_id}-{run}-call-{seq:08d}",
        "tenant_id": tenant.tenant_id,
        "call_id": f"call-{seq:08d}",
        "employee_id": rng.choice(tenant.employees),
        "direction": "INBOUND" if inbound else "OUTBOUND",
        "from_number": caller if inbound else number,
        "to_number": number if inbound else caller,
        "started_at": _iso(started),
        "answered_at": _iso(answered_at) if answered_at else None,
        "ended_at": _iso(ended),
        "disposition": disposition,
        "gateway_id": f"gw-{rng.randint(1, 4)}",
    }


def _invalid(call: dict[str, Any]) -> dict[str, Any]:
    """A record that decodes but cannot be rated: it ended before it was answered."""
    bad = dict(call, event_id=call["event_id"] + "-bad", disposition="ANSWERED")
    started = datetime.fromisoformat(call["started_at"])
    bad["answered_at"] = _iso(started + timedelta(seconds=30))
    bad["ended_at"] = _iso(started + timedelta(seconds=10))
    return bad


def generate(cfg: SimulationConfig) -> Iterator[dict[str, Any]]:
    """Yield events in publish order (deterministic for a seed); with ``now``, the same events less the
    calls that would end after it."""
    if cfg.now is not None:
        now = cfg.now
        for event in _generate(cfg):
            if event["type"] != "call" or datetime.fromisoformat(event["ended_at"]) <= now:
                yield event
        return
    yield from _generate(cfg)


def _generate(cfg: SimulationConfig) -> Iterator[dict[str, Any]]:
    rng = random.Random(cfg.seed)  # noqa: S311 - reproducible test traffic, not security
    tenants = _tenants(cfg, rng)
    parked_tenant = tenants[-1] if len(tenants) > 1 else None
    for tenant in tenants:
        if tenant is parked_tenant:
            # Its subscription follows its first calls: the worker must park them.
            yield from tenant.provisioning[1:]
        else:
            yield from tenant.provisioning
    late: list[dict[str, Any]] = []
    recent: list[dict[str, Any]] = []
    for seq in range(cfg.calls):
        tenant = tenants[seq % len(tenants)]
        call = _call(tenant, seq, rng, run_tag(cfg))
        roll = rng.random()
        if roll < cfg.invalid_rate:
            yield _invalid(call)
        if rng.random() < cfg.late_rate:
            late.append(call)
        else:
            yield call
        recent.append(call)
        if len(recent) > 64:
            recent.pop(0)
        if rng.random() < cfg.duplicate_rate:
            # A gateway retry: the very same record again, a little later.
            yield dict(rng.choice(recent))
        if parked_tenant is not None and seq == min(cfg.calls - 1, 10 * len(tenants)):
            yield parked_tenant.provisioning[0]
    yield from late


def write_jsonl(cfg: SimulationConfig, out: IO[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for event in generate(cfg):
        out.write(json.dumps(event, separators=(",", ":")) + "\n")
        counts[event["type"]] += 1
    return counts


def write_file(cfg: SimulationConfig, path: Path) -> Counter[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        return write_jsonl(cfg, handle)
