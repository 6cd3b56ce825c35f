"""`callmeter status`'s judgement and text, from what status.py gathered (pure: no I/O).

Thresholds mirror the Prometheus alerts in ``deploy/prometheus/alert_rules.yml``. Unhealthy (exit 1,
every reason on the last line) when:

- consumer lag is above ``--max-lag``;
- a worker process of this pipeline does not answer on its port (down, frozen, or the port taken by
  another pipeline's process, which is named and never counted);
- the duplicate rate or the dead letters of the last five minutes (summed over the processes) are
  above their thresholds;
- the ledger sink is stalled: it does not answer, it stopped on an error, its inserts are failing (it
  is retrying a batch the ledger refuses), or outputs have been waiting longer than
  ``--max-ledger-age`` while it wrote nothing;
- the ledger cannot be read.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.settings import Settings

TP = tuple[str, int]


@dataclass
class KafkaView:
    bootstrap: str
    cluster_id: str | None
    lag: dict[TP, int] = field(default_factory=dict)
    # Worker outputs the ledger sink has not written: when the oldest of each partition was published.
    waiting_since: dict[TP, float] = field(default_factory=dict)
    unanswered: list[TP] = field(default_factory=list)


@dataclass
class Probe:
    """One expected process: ``body`` is its /status when it answered as a process of this pipeline."""

    role: str  # "stream", "worker" (stream worker with the ledger sink inside) or "sink"
    index: int
    url: str
    body: dict[str, Any] | None = None
    problem: str | None = None  # nothing answers, or nothing in time
    frozen: bool = False
    stranger: str | None = None  # whose process answers instead

    @property
    def name(self) -> str:
        what = "ledger sink process" if self.role == "sink" else "worker process"
        return f"{what} {self.index} at {self.url}"


@dataclass
class LedgerNote:
    """Why the ledger's figures are not shown, and whether that is a problem."""

    text: str
    problem: bool


@dataclass(frozen=True)
class Thresholds:
    max_lag: int
    max_duplicate_ratio: float
    max_ledger_age_seconds: float


def render(
    settings: Settings,
    mine: dict[str, Any],
    kafka: KafkaView,
    probes: list[Probe],
    ledger: dict[str, Any] | LedgerNote,
    limits: Thresholds,
    now: float,
) -> tuple[str, list[str]]:
    """The status text and the problems (none: healthy)."""
    problems: list[str] = []
    lines = [
        f"callmeter status  (pipeline {mine['app_id']} on Kafka cluster {kafka.cluster_id} at "
        f"{kafka.bootstrap}; data dir {mine['data_dir']})",
        "",
        "consumer lag (messages)",
    ]
    by_topic: dict[str, list[str]] = {}
    for (topic, partition), n in kafka.lag.items():
        by_topic.setdefault(topic, []).append(f"p{partition}={n}")
    for topic, cells in by_topic.items():
        total = sum(n for (t, _p), n in kafka.lag.items() if t == topic)
        lines.append(f"  {topic:<28} {'  '.join(cells)}   total {total}")
    total_lag = sum(kafka.lag.values())
    if total_lag > limits.max_lag:
        problems.append(f"consumer lag {total_lag} > {limits.max_lag}")
    lines.append("")
    lines += _workers(probes, limits, problems)
    lines.append("")
    lines += _sink(probes, kafka, limits, now, problems)
    lines += _ledger(ledger, problems)
    lines.append("")
    lines.append("HEALTHY" if not problems else "UNHEALTHY: " + "; ".join(problems))
    return "\n".join(lines), problems


def _workers(probes: list[Probe], limits: Thresholds, problems: list[str]) -> list[str]:
    workers = [p for p in probes if p.role != "sink"]
    mine = [p for p in workers if p.body is not None]
    lines = []
    if not mine:
        urls = ", ".join(p.url for p in workers)
        lines.append(f"worker: DOWN (no worker process of this pipeline answers at {urls})")
        problems.append(f"no worker process of this pipeline answering at {urls}")
    else:
        lines.append(f"worker processes: {len(mine)} of {len(workers)} answering")
    for p in workers:
        lines.append(_process_line(p))
        if p.body is None and mine:
            problems.append(f"{p.name} {_absence(p)}")
    for p in probes:
        if p.stranger is not None:
            lines.append(f"  not counted: {p.url} is answered by {p.stranger}")
    if not mine:
        return lines
    statuses = [p.body or {} for p in mine]
    consumed, dups, dead = (sum(s.get("last_5_minutes", {}).get(k, 0) for s in statuses)
                            for k in ("consumed", "duplicates", "dead_letters"))  # fmt: skip
    rated = sum(s.get("stats", {}).get("rated", 0) for s in statuses)
    dup_total = sum(sum(s.get("stats", {}).get("duplicates", {}).values()) for s in statuses)
    dead_total: Counter[str] = Counter()
    for s in statuses:
        dead_total.update(s.get("stats", {}).get("dead_letters", {}))
    ratio = dups / consumed if consumed else 0.0
    lag_seconds = max(float(s.get("event_time_lag_seconds") or 0) for s in statuses)
    parked = sum(int(s.get("parked_calls") or 0) for s in statuses)
    by_reason = json.dumps(dict(sorted(dead_total.items()))) if dead_total else "none"
    lines += [
        f"last 5 min: {consumed} events, {dups} duplicates ({ratio:.4%}), {dead} dead letters",
        f"since start: rated {rated}, duplicates {dup_total}, dead letters by reason {by_reason}",
        f"event-time lag {lag_seconds:.1f} s (the most behind process); parked calls {parked}",
    ]
    if ratio > limits.max_duplicate_ratio:
        problems.append(f"duplicate rate {ratio:.4%} > {limits.max_duplicate_ratio:.4%}")
    if dead:
        problems.append(f"{dead} dead letters in the last 5 minutes")
    return lines


def _process_line(p: Probe) -> str:
    if p.body is None:
        return f"  process {p.index}  {p.url}  {_absence(p)}"
    ident = p.body.get("pipeline", {})
    partitions = ",".join(str(n) for n in p.body.get("assigned_calls_partitions", [])) or "none"
    state = "ready" if p.body.get("ready") else "starting"
    rated = p.body.get("stats", {}).get("rated", 0)
    return (
        f"  process {p.index}  {p.url}  pid {ident.get('pid')}  {state}  "
        f"calls partitions {partitions}  rated {rated}"
    )


def _absence(p: Probe) -> str:
    if p.stranger is not None:
        return "not answering as this pipeline (its port is taken by another process)"
    return p.problem or "not answering"


def _sink(
    probes: list[Probe], kafka: KafkaView, limits: Thresholds, now: float, problems: list[str]
) -> list[str]:
    host = next((p for p in probes if p.role in ("worker", "sink")), None)
    health: dict[str, Any] | None = None
    if host is None:
        where = "a `callmeter sink` service (not asked: pass --sink-url); judged from Kafka only"
    elif host.body is None:
        where = f"{host.name}: {_absence(host)}"
        problems.append(f"ledger sink ({host.name}) {_absence(host)}")
    else:
        inside = " (inside the worker)" if host.role == "worker" else ""
        where = f"{host.name}{inside}, pid {host.body.get('pipeline', {}).get('pid')}"
        health = host.body.get("sink")
    lines = [f"ledger sink: {where}"]
    last_write = None
    if host is not None and host.body is not None and health is None:
        lines.append("  starting: the ledger is not open yet")
    elif health is not None:
        last_write = health.get("last_write_unix")
        wrote = f"last write {now - last_write:.0f} s ago" if last_write else "no write yet"
        errors = health.get("insert_errors") or 0
        lines.append(
            f"  {wrote}; {health.get('rows_written', 0)} rows in {health.get('batches', 0)} batches since "
            f"it started; {errors or 'no'} failed insert attempt{'s' if errors != 1 else ''}"
        )
        if health.get("stopped_error"):
            problems.append(f"ledger sink stopped: {health['stopped_error']}")
        elif health.get("failing_since_unix"):
            since = now - float(health["failing_since_unix"])
            problems.append(
                f"ledger sink failing inserts for {since:.0f} s ({health.get('failed_attempts')} attempts): "
                f"{health.get('last_error')}"
            )
    if kafka.waiting_since:
        oldest = min(kafka.waiting_since.values())
        lines.append(
            f"  outputs waiting to be written: {len(kafka.waiting_since)} partition(s), the oldest "
            f"published {now - oldest:.0f} s ago"
        )
        # No write since the oldest waiting output was published (or since the last write, if later).
        idle = now - max(oldest, float(last_write or 0))
        if idle > limits.max_ledger_age_seconds:
            waiting = len(kafka.waiting_since)
            problems.append(f"ledger not written for {idle:.0f} s while {waiting} output partition(s) wait")
    else:
        lines.append("  outputs waiting to be written: none")
    if kafka.unanswered:
        lines.append(f"  outputs not checked (no answer from the broker in time): {len(kafka.unanswered)}")
    return lines


def _ledger(ledger: dict[str, Any] | LedgerNote, problems: list[str]) -> list[str]:
    if isinstance(ledger, LedgerNote):
        if ledger.problem:
            problems.append("ledger cannot be read")
        return [f"ledger: {ledger.text}"]
    last_ms = ledger.get("last_event_ms") or 0
    last = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last_ms / 1000)) if last_ms else "never"
    return [
        f"ledger: {ledger['rated_calls']} rated calls, {ledger['provisioning_events']} provisioning "
        f"events; last event written {last}",
        f"ledger dead letters by reason: {_figure(ledger['dead_letters'])}",
        f"ledger duplicates by kind: {_figure(ledger['duplicates'])}",
    ]


def _figure(counts: dict[str, int] | str) -> str:
    if isinstance(counts, str):
        return counts
    return json.dumps(counts, sort_keys=True) if counts else "none"
