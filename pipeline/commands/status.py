"""`callmeter status`: the on-call summary of this pipeline, readable at a glance, exit 1 when unhealthy.

It gathers three views and status_report.py judges them:

- Kafka, read directly: the cluster's id, consumer lag of the input topics, and the worker outputs the
  ledger sink has not written yet (its group's committed offsets, each partition read from there to its
  first waiting record). A broker that does not answer within a few seconds ends the command at once,
  with one line.
- Every process `callmeter worker` runs (pipeline/commands/supervisor.py ``process_roles``): stream worker
  process i on ``worker_web_port`` + i, and the ledger sink (inside worker process 0 when there is one
  process, else a process of its own on the next port). Each ``/status`` is asked at once, with a short
  timeout, and counted only when it states this pipeline (pipeline/identity.py): a process of another
  pipeline answering on one of these ports is named on one line and not counted.
- The ledger's own figures, read-only (through the process holding it, if any), so they show while the
  workers are down.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline.commands.status_report import KafkaView, LedgerNote, Probe, Thresholds, render
from pipeline.errors import BrokerError
from pipeline.identity import describe, ledger_location, remember_cluster_id, stranger
from pipeline.invoicing.completeness import first_waiting
from pipeline.offsets import GroupOffsets
from pipeline.settings import Settings

KAFKA_TIMEOUT_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 3.0


def run_status(settings: Settings, args: argparse.Namespace, bootstrap: str) -> int:
    from pipeline.commands.supervisor import process_roles

    kafka = kafka_view(settings, bootstrap)
    remember_cluster_id(kafka.cluster_id)
    mine = describe(settings, "status")
    base = str(args.url or f"http://127.0.0.1:{settings.worker_web_port}").rstrip("/")
    expected = [(role, index, _port_url(base, index)) for role, index in process_roles(settings)]
    if not settings.worker_ledger_sink and args.sink_url:
        expected.append(("sink", 0, str(args.sink_url).rstrip("/")))
    with ThreadPoolExecutor(max_workers=len(expected)) as pool:
        probes = list(pool.map(lambda e: probe(mine, *e), expected))
    holder = next((p for p in probes if p.role in ("worker", "sink")), None)
    if holder is not None and holder.frozen:
        ledger: dict[str, Any] | LedgerNote = LedgerNote(
            f"not read: the process holding it ({holder.name}) does not answer", problem=False
        )
    else:
        ledger = ledger_figures(settings)
    thresholds = Thresholds(args.max_lag, args.max_duplicate_ratio, args.max_ledger_age)
    text, problems = render(settings, mine, kafka, probes, ledger, thresholds, time.time())
    print(text)
    return 0 if not problems else 1


def _port_url(base: str, offset: int) -> str:
    parts = urllib.parse.urlsplit(base)
    host = parts.hostname or "127.0.0.1"
    port = (parts.port or 80) + offset
    return f"{parts.scheme or 'http'}://{host}:{port}"


def probe(mine: dict[str, Any], role: str, index: int, url: str) -> Probe:
    """What answers at ``url``'s ``/status``: a process of this pipeline, another's, or nothing."""
    found = Probe(role, index, url)
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=PROBE_TIMEOUT_SECONDS) as resp:  # noqa: S310
            body = json.loads(resp.read())
    except TimeoutError:
        found.problem, found.frozen = f"does not answer within {PROBE_TIMEOUT_SECONDS:g} s", True
        return found
    except urllib.error.HTTPError as exc:
        found.stranger = f"a server that is not a callmeter process (HTTP {exc.code} for /status)"
        return found
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            found.problem, found.frozen = f"does not answer within {PROBE_TIMEOUT_SECONDS:g} s", True
        else:
            found.problem = "DOWN (nothing answers)"
        return found
    except (OSError, ValueError):
        found.stranger = "a server that is not a callmeter process (no JSON at /status)"
        return found
    whose = stranger(mine, body.get("pipeline") if isinstance(body, dict) else None)
    if whose is not None:
        found.stranger = whose
    elif body["pipeline"].get("role") != role:
        found.stranger = f"this pipeline's {body['pipeline'].get('role')} process, not the expected {role}"
    else:
        found.body = body
    return found


def kafka_view(settings: Settings, bootstrap: str) -> KafkaView:
    """Cluster id, input lag and the outputs waiting for the sink; one line and BrokerError when the
    cluster does not answer within ``KAFKA_TIMEOUT_SECONDS``."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "log_level": 0, "error_cb": lambda _e: None}
    admin = AdminClient(conf)
    try:
        meta = admin.list_topics(timeout=KAFKA_TIMEOUT_SECONDS)
        view = KafkaView(bootstrap, meta.cluster_id)
        topics = settings.topics
        tps = [
            TopicPartition(t, p)
            for t in (*topics.inputs, *topics.ledger_inputs)
            if t in meta.topics
            for p in meta.topics[t].partitions
        ]
        if not tps:
            return view
        ends = admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in tps}, request_timeout=KAFKA_TIMEOUT_SECONDS
        )
        high = {(tp.topic, tp.partition): f.result().offset for tp, f in ends.items()}
        inputs = [key for key in high if key[0] in topics.inputs]
        outputs = [key for key in high if key[0] not in topics.inputs]
        committed = _committed(bootstrap, settings.app_id, inputs)
        view.lag = {key: max(high[key] - max(committed.get(key, 0), 0), 0) for key in sorted(inputs)}
        # Committed offsets stop before a transaction's marker: what waits is found by reading.
        sink_at = _committed(bootstrap, f"{settings.app_id}-ledger", outputs)
        start = {key: max(sink_at.get(key, -1), 0) for key in outputs if high[key] > 0}
        first = first_waiting(bootstrap, start, KAFKA_TIMEOUT_SECONDS)
        view.waiting_since = {key: ts_ms / 1000 for key, ts_ms in first.items() if ts_ms is not None}
        view.unanswered = sorted(set(start) - set(first))
        return view
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        reason = err.str() if hasattr(err, "str") else str(err)
        msg = f"Kafka at {bootstrap} did not answer within {KAFKA_TIMEOUT_SECONDS:g} s ({reason})"
        raise BrokerError(msg) from exc


def _committed(bootstrap: str, group: str, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    reader = GroupOffsets(bootstrap, group)
    try:
        return reader.committed(tps, timeout=KAFKA_TIMEOUT_SECONDS)
    finally:
        reader.close()


_LEDGER_FIGURES = """
SELECT
    (SELECT count() FROM current_ratings) AS rated_calls,
    (SELECT count() FROM provisioning_events FINAL) AS provisioning_events,
    (SELECT toUnixTimestamp64Milli(max(ingested_at)) FROM raw_events) AS last_event_ms,
    (SELECT groupArray((reason, n)) FROM (SELECT reason, sum(dead_letters) AS n
        FROM dead_letters_by_reason GROUP BY reason ORDER BY reason)) AS dead_letters
"""
_TABLES = "SELECT name FROM system.tables WHERE database = currentDatabase()"
# Migration 6; a ledger not migrated yet (the worker of a new version has not started) lacks it.
_LEDGER_DUPLICATES = """
SELECT kind, sum(duplicates) AS n FROM duplicates_by_gateway GROUP BY kind ORDER BY kind
"""


def ledger_figures(settings: Settings) -> dict[str, Any] | LedgerNote:
    """What the ledger holds, read-only (through the process holding it, if any); a one-line note
    instead when it cannot be read, or holds nothing yet. Works whether or not a worker runs."""
    from pipeline.ledgerquery.sql import run_sql
    from sinks.errors import LedgerError

    dsn, secret = settings.clickhouse_dsn, settings.clickhouse_secret
    where = ledger_location(settings)
    # Opening a missing embedded ledger would create it: a status must change nothing.
    if dsn.startswith("chdb:") and not Path(where).exists():
        return LedgerNote(f"empty: nothing written yet (no ledger at {where})", problem=False)
    try:
        tables = {str(name) for (name,) in run_sql(dsn, secret, _TABLES, timeout_seconds=30)[1]}
        if "current_ratings" not in tables:
            return LedgerNote(
                "empty: no tables yet (a worker or sink creates them as it starts)", problem=False
            )
        columns, rows = run_sql(dsn, secret, _LEDGER_FIGURES, timeout_seconds=30)
        figures = dict(zip(columns, rows[0], strict=True))
        figures["dead_letters"] = {str(reason): int(n) for reason, n in figures["dead_letters"]}
        figures["duplicates"] = "not recorded by this ledger yet (schema before migration 6)"
        if "duplicates_by_gateway" in tables:
            _columns, kinds = run_sql(dsn, secret, _LEDGER_DUPLICATES, timeout_seconds=30)
            figures["duplicates"] = {str(kind): int(n) for kind, n in kinds}
    except LedgerError as exc:
        return LedgerNote(f"cannot be read: {exc}", problem=True)
    return figures
