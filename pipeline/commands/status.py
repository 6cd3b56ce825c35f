"""`callmeter status`: the on-call summary, readable at a glance, non-zero when unhealthy.

Lag comes straight from Kafka and the ledger's figures from the ledger (read-only, so both work while
the worker is down); duplicate rate, recent dead letters, event-time lag and ledger freshness come
from the worker's ``/status``. Thresholds mirror the
Prometheus alerts in ``deploy/prometheus/alert_rules.yml``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline.offsets import committed_offsets
from pipeline.settings import Settings


@dataclass
class Health:
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def kafka_lag(settings: Settings, bootstrap: str) -> dict[tuple[str, int], int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(timeout=10)
    tps = [
        TopicPartition(t, p)
        for t in settings.topics.inputs
        if t in meta.topics
        for p in meta.topics[t].partitions
    ]
    if not tps:
        return {}
    ends = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=10)
    high = {(tp.topic, tp.partition): f.result().offset for tp, f in ends.items()}
    committed = {k: max(v, 0) for k, v in committed_offsets(bootstrap, settings.app_id, list(high)).items()}
    return {key: max(end - committed.get(key, 0), 0) for key, end in sorted(high.items())}


def worker_status(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=5) as resp:  # noqa: S310 - operator-given URL
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except (OSError, urllib.error.URLError, ValueError):
        return None


_LEDGER_FIGURES = """
SELECT
    (SELECT count() FROM current_ratings) AS rated_calls,
    (SELECT count() FROM provisioning_events FINAL) AS provisioning_events,
    (SELECT toUnixTimestamp64Milli(max(ingested_at)) FROM raw_events) AS last_event_ms,
    (SELECT groupArray((reason, n)) FROM (SELECT reason, sum(dead_letters) AS n
        FROM dead_letters_by_reason GROUP BY reason ORDER BY reason)) AS dead_letters
"""
# Migration 6; a ledger not migrated yet (the worker of a new version has not started) lacks it.
_LEDGER_DUPLICATES = """
SELECT kind, sum(duplicates) AS n FROM duplicates_by_gateway GROUP BY kind ORDER BY kind
"""


def ledger_figures(settings: Settings) -> dict[str, Any] | str:
    """What the ledger holds, read-only (through the process holding it, if any); a one-line reason
    instead when it cannot be read. Works whether or not a worker runs."""
    from sinks.errors import LedgerError
    from sinks.query import run_sql

    dsn, secret = settings.clickhouse_dsn, settings.clickhouse_secret
    try:
        columns, rows = run_sql(dsn, secret, _LEDGER_FIGURES, timeout_seconds=30)
    except LedgerError as exc:
        return str(exc)
    figures = dict(zip(columns, rows[0], strict=True))
    figures["dead_letters"] = {str(reason): int(n) for reason, n in figures["dead_letters"]}
    try:
        _columns, kinds = run_sql(dsn, secret, _LEDGER_DUPLICATES, timeout_seconds=30)
        figures["duplicates"] = {str(kind): int(n) for kind, n in kinds}
    except LedgerError:
        figures["duplicates"] = "not recorded by this ledger yet (schema before migration 6)"
    return figures


def _figure(counts: dict[str, int] | str) -> str:
    if isinstance(counts, str):
        return counts
    return json.dumps(counts, sort_keys=True) if counts else "none"


def render(
    settings: Settings,
    lag: dict[tuple[str, int], int],
    status: dict[str, Any] | None,
    ledger: dict[str, Any] | str,
    url: str,
    max_lag: int,
    max_duplicate_ratio: float,
    max_ledger_age_seconds: float,
) -> tuple[str, Health]:
    health = Health()
    lines = [f"callmeter status  (topics {settings.topic('*')}, worker {url})", ""]
    lines.append("consumer lag (messages)")
    by_topic: dict[str, list[str]] = {}
    for (topic, partition), n in lag.items():
        by_topic.setdefault(topic, []).append(f"p{partition}={n}")
    for topic, cells in by_topic.items():
        lines.append(
            f"  {topic:<28} {'  '.join(cells)}   total {sum(lag[(topic, p)] for (t, p) in lag if t == topic)}"
        )
    total_lag = sum(lag.values())
    health.check(total_lag <= max_lag, f"consumer lag {total_lag} > {max_lag}")
    if status is None:
        lines.append("")
        lines.append(f"worker: DOWN (nothing answers at {url}); the figures below are the ledger's")
        health.problems.append(f"no worker answering at {url}")
    else:
        window = status.get("last_5_minutes", {})
        consumed, dups, dead = (
            window.get("consumed", 0),
            window.get("duplicates", 0),
            window.get("dead_letters", 0),
        )
        ratio = dups / consumed if consumed else 0.0
        stats = status.get("stats", {})
        dead_total = stats.get("dead_letters", {})
        dup_total = sum(stats.get("duplicates", {}).values())
        lines += [
            "",
            f"worker: {'ready' if status.get('ready') else 'starting'}; "
            f"event-time lag {status.get('event_time_lag_seconds', 0):.1f} s; "
            f"parked calls {int(status.get('parked_calls') or 0)}",
            f"last 5 min: {consumed} events, {dups} duplicates ({ratio:.4%}), {dead} dead letters",
            f"since start: rated {stats.get('rated', 0)}, duplicates {dup_total}, "
            f"dead letters by reason {json.dumps(dead_total) if dead_total else 'none'}",
        ]
        health.check(ratio <= max_duplicate_ratio, f"duplicate rate {ratio:.4%} > {max_duplicate_ratio:.4%}")
        health.check(dead == 0, f"{dead} dead letters in the last 5 minutes")
        last_write = status.get("ledger_last_write_unix") or 0
        if last_write:
            age = time.time() - float(last_write)
            lines.append(f"ledger: last write {age:.0f} s ago")
            health.check(
                age <= max_ledger_age_seconds or total_lag == 0,
                f"ledger not written for {age:.0f} s while input is waiting",
            )
        else:
            lines.append("ledger: no write yet by this worker")
    lines.append("")
    if isinstance(ledger, str):
        lines.append(f"ledger: cannot be read: {ledger}")
        health.problems.append("ledger cannot be read")
    else:
        last_ms = ledger.get("last_event_ms") or 0
        last = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last_ms / 1000)) if last_ms else "never"
        dead, dups = ledger["dead_letters"], ledger["duplicates"]
        lines += [
            f"ledger: {ledger['rated_calls']} rated calls, {ledger['provisioning_events']} provisioning "
            f"events; last event written {last}",
            f"ledger dead letters by reason: {_figure(dead)}",
            f"ledger duplicates by kind: {_figure(dups)}",
        ]
    lines.append("")
    lines.append("HEALTHY" if not health.problems else "UNHEALTHY: " + "; ".join(health.problems))
    return "\n".join(lines), health
