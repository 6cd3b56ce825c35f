"""Prometheus metrics of the worker, served on its ``/metrics``.

Names carry their unit; labels stay low-cardinality: topic, partition, reason, table, threshold — never
tenant_id (per-tenant views come from the balance API and from ClickHouse, not from time series).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# *_created series double the exposition for no dashboard or alert use.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_CONSUMED = Counter(
    "callmeter_events_consumed",
    "Input records consumed, duplicates and bad ones included.",
    ["topic"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "callmeter_duplicates",
    "Input records dropped as duplicates of an accepted event.",
    ["topic"],
    registry=REGISTRY,
)
REDELIVERED_EVENTS = Counter(
    "callmeter_redelivered_events",
    "Input records the consumer delivered again within one assignment, skipped (stream/continuity.py).",
    ["topic"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "callmeter_dead_letters",
    "Records sent to the dead-letter topic, by reason code.",
    ["reason"],
    registry=REGISTRY,
)
RATED_CALLS = Counter("callmeter_rated_calls", "Calls rated.", registry=REGISTRY)
RATED_RECORDS_PRODUCED = Counter(
    "callmeter_rated_records_produced", "RatedCall records sent to the rated topic.", registry=REGISTRY
)
BILLABLE_SECONDS = Counter("callmeter_billable_seconds", "Billable seconds rated.", registry=REGISTRY)
RATING_SECONDS = Histogram(
    "callmeter_rating_duration_seconds",
    "Time to process one input event in the worker.",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
    registry=REGISTRY,
)
PARKED_CALLS = Gauge(
    "callmeter_parked_calls",
    "Calls waiting for their tenant's subscription (this worker's partitions).",
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "callmeter_consumer_lag_messages",
    "High watermark minus committed offset.",
    ["topic", "partition"],
    registry=REGISTRY,
)
EVENT_TIME_LAG = Gauge(
    "callmeter_event_time_lag_seconds",
    "Age (by record timestamp) of the oldest input record not yet processed; 0 when caught up.",
    registry=REGISTRY,
)
LAST_EVENT_TIMESTAMP = Gauge(
    "callmeter_last_event_processed_timestamp_seconds",
    "Unix time the worker last processed an input record.",
    registry=REGISTRY,
)
LEDGER_ROWS = Counter(
    "callmeter_ledger_rows_written", "Rows inserted into the ClickHouse ledger.", ["table"], registry=REGISTRY
)
LEDGER_BATCH_ROWS = Histogram(
    "callmeter_ledger_batch_rows",
    "Rows per ledger flush.",
    buckets=(1, 10, 100, 1000, 5000, 20000, 50000),
    registry=REGISTRY,
)
LEDGER_INSERT_SECONDS = Histogram(
    "callmeter_ledger_insert_duration_seconds",
    "Duration of one ledger flush.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
LEDGER_INSERT_ERRORS = Counter(
    "callmeter_ledger_insert_errors", "Ledger flushes that failed.", registry=REGISTRY
)
LEDGER_INSERT_RETRIES = Counter(
    "callmeter_ledger_insert_retries", "Ledger flushes retried after a failure.", registry=REGISTRY
)
LEDGER_DUPLICATES = Counter(
    "callmeter_ledger_duplicates",
    "Copies of an event the stream accepted but the ledger already held (fresh cluster, past retention).",
    ["kind"],
    registry=REGISTRY,
)
LEDGER_LAST_WRITE = Gauge(
    "callmeter_ledger_last_write_timestamp_seconds",
    "Unix time of the last successful ledger flush.",
    registry=REGISTRY,
)
BALANCE_REQUESTS = Counter(
    "callmeter_balance_requests", "Balance API requests, by HTTP status.", ["status"], registry=REGISTRY
)
BALANCE_SECONDS = Histogram(
    "callmeter_balance_request_duration_seconds",
    "Balance API latency.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=REGISTRY,
)
TENANT_API_REQUESTS = Counter(
    "callmeter_tenant_api_requests",
    "Pre-call authorization and quota API requests answered here, by endpoint and HTTP status.",
    ["endpoint", "status"],
    registry=REGISTRY,
)
TENANT_API_SECONDS = Histogram(
    "callmeter_tenant_api_request_duration_seconds",
    "Time to answer an authorization or quota request on the owning worker (target p99 < 5 ms).",
    ["endpoint"],
    buckets=(0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
    registry=REGISTRY,
)
ALERTS_EMITTED = Counter(
    "callmeter_alerts_emitted", "Alerts sent to the alerts topic.", ["kind", "threshold"], registry=REGISTRY
)
LATE_EVENTS = Counter(
    "callmeter_late_events", "Calls whose period was already finalized when they arrived.", registry=REGISTRY
)


def initialize(input_topics: Iterable[str]) -> None:
    """Create the per-topic counters at 0. A labelled counter otherwise appears at its first increment,
    already above 0, and rate()/increase() cannot see that first step: a burst of duplicates right after
    a start would never raise CallmeterDuplicateRateHigh (seen with a real Prometheus)."""
    for topic in input_topics:
        EVENTS_CONSUMED.labels(topic=topic)
        DUPLICATES.labels(topic=topic)


def endpoint_meters(endpoint: str) -> tuple[Callable[[str], None], Callable[[float], None]]:
    """Request counter (by status) and latency histogram of a tenant endpoint: ``balances`` keeps its
    own metric names, ``authorize`` and ``quota`` share the tenant API's."""
    if endpoint == "balances":
        return (lambda status: BALANCE_REQUESTS.labels(status=status).inc()), BALANCE_SECONDS.observe
    return (
        lambda status: TENANT_API_REQUESTS.labels(endpoint=endpoint, status=status).inc(),
        TENANT_API_SECONDS.labels(endpoint=endpoint).observe,
    )
