"""The ClickHouse ledger behind a small port: ``add()`` rows, ``flush()`` them, query what invoices need.

How redelivery is kept from counting twice (the sink may write a batch again after a crash between the
ClickHouse insert and its Kafka offset commit):

1. Every table is a ReplacingMergeTree whose sorting key is the record's identity — ``(tenant_id,
   event_id, catalog_revision)`` for rated calls, ``(topic, tenant_id, event_id)`` for raw events — so
   copies of one record collapse to one row.
2. Collapsing happens only at merge time, so every query that counts money reads through ``FINAL`` or
   ``argMax(..., catalog_revision)`` grouped by the identity: a not-yet-merged copy is never summed.
3. Inserts carry an ``insert_deduplication_token`` built from the source offsets of the batch, and the
   tables raise ``non_replicated_deduplication_window``, so the common case (the same batch resent
   whole) is refused at insert time and never even reaches a merge.

The ledger is append-only (spec §9): a re-rating adds a row with a higher catalog revision; nothing
is updated or deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from sinks.errors import LedgerError

log = logging.getLogger(__name__)

_TS = "DateTime64(3, 'UTC')"
_REPLACING = "SETTINGS non_replicated_deduplication_window = 1000"

RAW_EVENT_COLUMNS = (
    "topic",
    "tenant_id",
    "event_id",
    "event_type",
    "event_time",
    "payload",
    "source_partition",
    "source_offset",
    "ingested_at",
)
RATED_CALL_COLUMNS = (
    "tenant_id",
    "event_id",
    "call_id",
    "employee_id",
    "direction",
    "from_number",
    "to_number",
    "started_at",
    "answered_at",
    "ended_at",
    "disposition",
    "gateway_id",
    "period_start",
    "period_end",
    "plan_id",
    "raw_seconds",
    "billable_seconds",
    "catalog_revision",
    "late",
    "rated_at",
    "source_partition",
    "source_offset",
)
PROVISIONING_COLUMNS = (
    "tenant_id",
    "event_id",
    "occurred_at",
    "action",
    "plan_id",
    "tax_region",
    "number",
    "number_type",
    "employee_id",
    "source_partition",
    "source_offset",
)
DEAD_LETTER_COLUMNS = (
    "source_topic",
    "source_partition",
    "source_offset",
    "reason",
    "message",
    "key",
    "value_hex",
    "failed_at",
)
CATALOG_COLUMNS = ("revision", "sha256", "body", "loaded_at")
ADJUSTMENT_COLUMNS = (
    "carried_on_invoice_id",
    "corrects_invoice_id",
    "tenant_id",
    "amount",
    "reason",
    "catalog_revision",
    "status",
    "generated_at",
)
INVOICE_COLUMNS = (
    "invoice_id",
    "tenant_id",
    "period_start",
    "period_end",
    "plan_id",
    "catalog_revision",
    "currency",
    "subtotal",
    "tax",
    "total",
    "body",
    "generated_at",
    "status",
)
INVOICE_LINE_COLUMNS = (
    "invoice_id",
    "line_no",
    "code",
    "description",
    "number",
    "quantity",
    "unit_price",
    "amount",
    "generated_at",
)

CORRECTION_COLUMNS = (
    "tenant_id",
    "event_id",
    "period_start",
    "plan_id",
    "billable_seconds",
    "catalog_revision",
    "reason",
    "corrected_at",
)

COLUMNS: dict[str, tuple[str, ...]] = {
    "raw_events": RAW_EVENT_COLUMNS,
    "rated_calls": RATED_CALL_COLUMNS,
    "provisioning_events": PROVISIONING_COLUMNS,
    "dead_letters": DEAD_LETTER_COLUMNS,
    "invoices": INVOICE_COLUMNS,
    "invoice_lines": INVOICE_LINE_COLUMNS,
    "catalogs": CATALOG_COLUMNS,
    "adjustments": ADJUSTMENT_COLUMNS,
    "rating_corrections": CORRECTION_COLUMNS,
}

# Versioned DDL: append a new entry to change the schema; never edit an applied one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "ledger tables",
        [
            f"""CREATE TABLE IF NOT EXISTS raw_events (
                topic LowCardinality(String), tenant_id String, event_id String,
                event_type LowCardinality(String), event_time {_TS}, payload String,
                source_partition UInt32, source_offset UInt64, ingested_at {_TS}
            ) ENGINE = ReplacingMergeTree ORDER BY (topic, tenant_id, event_id) {_REPLACING}""",
            f"""CREATE TABLE IF NOT EXISTS rated_calls (
                tenant_id String, event_id String, call_id String, employee_id Nullable(String),
                direction LowCardinality(String), from_number String, to_number String,
                started_at {_TS}, answered_at Nullable({_TS}), ended_at {_TS},
                disposition LowCardinality(String), gateway_id LowCardinality(String),
                period_start {_TS}, period_end {_TS}, plan_id LowCardinality(String),
                raw_seconds Decimal(18, 3), billable_seconds UInt64, catalog_revision UInt32,
                late UInt8, rated_at {_TS}, source_partition UInt32, source_offset UInt64
            ) ENGINE = ReplacingMergeTree ORDER BY (tenant_id, event_id, catalog_revision) {_REPLACING}""",
            f"""CREATE TABLE IF NOT EXISTS provisioning_events (
                tenant_id String, event_id String, occurred_at {_TS}, action LowCardinality(String),
                plan_id Nullable(String), tax_region Nullable(String), number Nullable(String),
                number_type Nullable(String), employee_id Nullable(String),
                source_partition UInt32, source_offset UInt64
            ) ENGINE = ReplacingMergeTree ORDER BY (tenant_id, event_id) {_REPLACING}""",
            f"""CREATE TABLE IF NOT EXISTS dead_letters (
                source_topic LowCardinality(String), source_partition UInt32, source_offset UInt64,
                reason LowCardinality(String), message String, key Nullable(String), value_hex String,
                failed_at {_TS}
            ) ENGINE = ReplacingMergeTree ORDER BY (source_topic, source_partition, source_offset)
            {_REPLACING}""",
            f"""CREATE TABLE IF NOT EXISTS invoices (
                invoice_id String, tenant_id String, period_start Date, period_end Date,
                plan_id String, catalog_revision UInt32, currency String, subtotal Decimal(18, 2),
                tax Decimal(18, 2), total Decimal(18, 2), body String, generated_at {_TS}
            ) ENGINE = ReplacingMergeTree(generated_at) ORDER BY (invoice_id)""",
            f"""CREATE TABLE IF NOT EXISTS invoice_lines (
                invoice_id String, line_no UInt16, code LowCardinality(String), description String,
                number Nullable(String), quantity String, unit_price String, amount Decimal(18, 2),
                generated_at {_TS}
            ) ENGINE = ReplacingMergeTree(generated_at) ORDER BY (invoice_id, line_no)""",
        ],
    ),
    (
        2,
        "catalog revisions, final invoices, adjustments",
        [
            # draft | final. A final invoice row is never followed by another row for its id.
            "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS status LowCardinality(String) DEFAULT 'draft'",
            # Every catalog revision the ledger has used, verbatim: old charges are recomputed with the
            # revision that produced them, and one revision number can never mean two catalogs.
            f"""CREATE TABLE IF NOT EXISTS catalogs (
                revision UInt32, sha256 String, body String, loaded_at {_TS}
            ) ENGINE = ReplacingMergeTree ORDER BY revision""",
            f"""CREATE TABLE IF NOT EXISTS adjustments (
                carried_on_invoice_id String, corrects_invoice_id String, tenant_id String,
                amount Decimal(18, 2), reason String, catalog_revision UInt32,
                status LowCardinality(String), generated_at {_TS}
            ) ENGINE = ReplacingMergeTree(generated_at)
            ORDER BY (carried_on_invoice_id, corrects_invoice_id)""",
        ],
    ),
    (
        3,
        "rating corrections and each call's current rating",
        [
            # The invoice job rates every call against the tenant's whole provisioning history (issue 8).
            # Where that differs from the stream's rating (provisioning consumed after the call), it
            # appends a correction here; nothing in rated_calls is edited. period_start is NULL when no
            # subscription covers the call any more (billable 0).
            f"""CREATE TABLE IF NOT EXISTS rating_corrections (
                tenant_id String, event_id String, period_start Nullable({_TS}),
                plan_id LowCardinality(String), billable_seconds UInt64, catalog_revision UInt32,
                reason String, corrected_at {_TS}
            ) ENGINE = ReplacingMergeTree(corrected_at)
            ORDER BY (tenant_id, event_id, catalog_revision) {_REPLACING}""",
            # Each call's current rating: the stream's (or a replay's) row with the highest catalog
            # revision, overridden by the invoice job's latest correction for that revision.
            """CREATE VIEW IF NOT EXISTS current_ratings AS
            SELECT r.tenant_id AS tenant_id, r.event_id AS event_id,
                   if(c.event_id = '', r.ps, c.ps) AS period_start,
                   if(c.event_id = '', r.plan, c.plan) AS plan_id,
                   if(c.event_id = '', r.billable, c.billable) AS billable_seconds,
                   r.rev AS catalog_revision, c.event_id != '' AS corrected,
                   c.why AS correction_reason
            FROM (
                SELECT tenant_id, event_id, max(catalog_revision) AS rev,
                       toNullable(argMax(period_start, catalog_revision)) AS ps,
                       argMax(plan_id, catalog_revision) AS plan,
                       argMax(billable_seconds, catalog_revision) AS billable
                FROM rated_calls GROUP BY tenant_id, event_id
            ) AS r
            LEFT JOIN (
                SELECT tenant_id, event_id, catalog_revision AS rev,
                       argMax(period_start, corrected_at) AS ps,
                       argMax(plan_id, corrected_at) AS plan,
                       argMax(billable_seconds, corrected_at) AS billable,
                       argMax(reason, corrected_at) AS why
                FROM rating_corrections GROUP BY tenant_id, event_id, catalog_revision
            ) AS c
            ON r.tenant_id = c.tenant_id AND r.event_id = c.event_id AND r.rev = c.rev""",
        ],
    ),
]


def connect(dsn: str, password: str | None = None) -> Client:
    """Open a clickhouse-connect client: ``chdb:///path`` embedded, ``http(s)://`` a server."""
    try:
        if dsn.startswith("chdb:"):
            return clickhouse_connect.get_client(dsn=dsn)
        kwargs: dict[str, Any] = {"dsn": dsn}
        if password is not None:
            kwargs["password"] = password
        return clickhouse_connect.get_client(**kwargs)
    except Exception as exc:  # the driver raises many kinds; the caller needs one
        msg = f"cannot open the ClickHouse ledger at {dsn.split('@')[-1]}: {_one_line(exc)}"
        raise LedgerError(msg) from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class Ledger:
    """Buffered writer and reader of the ledger tables."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._buffers: dict[str, list[Sequence[Any]]] = {name: [] for name in COLUMNS}

    @classmethod
    def open(cls, dsn: str, password: str | None = None) -> Ledger:
        ledger = cls(connect(dsn, password))
        ledger.migrate()
        return ledger

    def close(self) -> None:
        self.client.close()

    # -- schema ---------------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply every migration not yet recorded; return the versions applied now."""
        try:
            self.client.command(
                f"CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
                f"applied_at {_TS}) ENGINE = MergeTree ORDER BY version"
            )
            done = {row[0] for row in self.client.query("SELECT version FROM schema_migrations").result_rows}
            applied = []
            for version, name, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    self.client.command(statement)
                self.client.insert(
                    "schema_migrations",
                    [[version, name, datetime.now(UTC)]],
                    column_names=["version", "name", "applied_at"],
                )
                applied.append(version)
            return applied
        except LedgerError:
            raise
        except Exception as exc:
            msg = f"ledger migration failed: {_one_line(exc)}"
            raise LedgerError(msg) from exc

    # -- the port -------------------------------------------------------------------------------------
    def add(self, table: str, row: Sequence[Any]) -> None:
        self._buffers[table].append(row)

    def pending_by_table(self) -> dict[str, int]:
        return {table: len(rows) for table, rows in self._buffers.items() if rows}

    def pending(self) -> int:
        return sum(len(rows) for rows in self._buffers.values())

    def flush(self, dedup_token: str | None = None) -> int:
        """Insert every buffered row. Raises LedgerError and keeps the buffer when any insert fails,
        so the caller must not commit its source offsets (the batch will be redelivered)."""
        written = 0
        for table, rows in self._buffers.items():
            if not rows:
                continue
            settings = {"insert_deduplication_token": f"{dedup_token}:{table}"} if dedup_token else None
            try:
                self.client.insert(table, rows, column_names=list(COLUMNS[table]), settings=settings)
            except Exception as exc:
                msg = f"ledger insert into {table} failed ({len(rows)} rows): {_one_line(exc)}"
                raise LedgerError(msg) from exc
            written += len(rows)
            rows.clear()
        return written

    def discard(self) -> None:
        for rows in self._buffers.values():
            rows.clear()

    # -- queries --------------------------------------------------------------------------------------
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        try:
            return [tuple(r) for r in self.client.query(sql, parameters=parameters).result_rows]
        except Exception as exc:
            msg = f"ledger query failed: {_one_line(exc)}"
            raise LedgerError(msg) from exc

    def usage_seconds(self, period_from: datetime, period_to: datetime) -> dict[tuple[str, datetime], int]:
        """Billable seconds per (tenant, period start) for periods starting in [from, to), taking each
        call's current rating (its row with the highest catalog revision)."""
        rows = self.query(
            """
            SELECT tenant_id, period_start, sum(billable_seconds) FROM current_ratings
            WHERE period_start >= {f:DateTime64(3, 'UTC')} AND period_start < {t:DateTime64(3, 'UTC')}
            GROUP BY tenant_id, period_start
            """,
            {"f": period_from, "t": period_to},
        )
        return {(tenant, as_utc(start)): int(seconds) for tenant, start, seconds in rows}

    def call_facts(
        self, started_from: datetime, started_to: datetime, tenant_id: str | None = None
    ) -> list[tuple[Any, ...]]:
        """The raw facts rating needs of every deduplicated accepted call that started in [from, to):
        ``(tenant_id, event_id, started_at, answered_at, ended_at, disposition, highest catalog revision
        that rated it, late)``.

        Invoices rate these against the tenant's whole provisioning timeline (docs/decisions.md,
        "Order of events"), so the stream's provisional rating never decides money. Every row of one
        call carries the same facts; ``argMin`` by source offset takes the first-seen copy's."""
        tenant_clause = "AND tenant_id = {t:String}" if tenant_id else ""
        rows = self.query(
            "SELECT tenant_id, event_id, argMin(started_at, source_offset), "  # noqa: S608
            "argMin(answered_at, source_offset), argMin(ended_at, source_offset), "
            "argMin(disposition, source_offset), max(catalog_revision), max(late) FROM rated_calls "
            "WHERE started_at >= {f:DateTime64(3, 'UTC')} AND started_at < {u:DateTime64(3, 'UTC')} "
            f"{tenant_clause} GROUP BY tenant_id, event_id ORDER BY tenant_id, event_id",
            {"f": started_from, "u": started_to, "t": tenant_id},
        )
        return [
            (t, e, as_utc(s), None if a is None else as_utc(a), as_utc(x), d, int(r), bool(late))
            for t, e, s, a, x, d, r, late in rows
        ]

    def current_rating_of(
        self, started_from: datetime, started_to: datetime, tenant_id: str | None = None
    ) -> dict[tuple[str, str], tuple[datetime | None, str, int, int]]:
        """(tenant, event) -> (period start, plan, billable seconds, catalog revision) from
        ``current_ratings``, for calls that started in [from, to)."""
        tenant_clause = "AND r.tenant_id = {t:String}" if tenant_id else ""
        rows = self.query(
            "SELECT r.tenant_id, r.event_id, r.period_start, r.plan_id, r.billable_seconds, "  # noqa: S608
            "r.catalog_revision FROM current_ratings AS r WHERE (r.tenant_id, r.event_id) IN ("
            "SELECT tenant_id, event_id FROM rated_calls WHERE started_at >= {f:DateTime64(3, 'UTC')} "
            f"AND started_at < {{u:DateTime64(3, 'UTC')}}) {tenant_clause}",
            {"f": started_from, "u": started_to, "t": tenant_id},
        )
        return {
            (t, e): (None if p is None else as_utc(p), str(plan), int(b), int(rev))
            for t, e, p, plan, b, rev in rows
        }

    def provisioning_rows(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        where = "WHERE tenant_id = {t:String}" if tenant_id else ""
        rows = self.query(
            # Only constant column names and a fixed WHERE are interpolated; the tenant is a parameter.
            f"SELECT {', '.join(PROVISIONING_COLUMNS[:9])} FROM provisioning_events FINAL {where} "  # noqa: S608
            "ORDER BY tenant_id, occurred_at, event_id",
            {"t": tenant_id} if tenant_id else None,
        )
        out = []
        for row in rows:
            record = dict(zip(PROVISIONING_COLUMNS[:9], row, strict=True))
            record["occurred_at"] = as_utc(record["occurred_at"])
            out.append(record)
        return out

    def count(self, table: str, final: bool = True) -> int:
        if table not in COLUMNS:
            msg = f"unknown ledger table {table}"
            raise LedgerError(msg)
        rows = self.query(f"SELECT count() FROM {table}{' FINAL' if final else ''}")  # noqa: S608
        return int(rows[0][0])

    def dead_letter_counts(self) -> dict[str, int]:
        rows = self.query("SELECT reason, count() FROM dead_letters FINAL GROUP BY reason ORDER BY reason")
        return {reason: int(n) for reason, n in rows}

    def billable_seconds_by_tenant(self) -> dict[str, int]:
        rows = self.query(
            "SELECT tenant_id, sum(billable_seconds) FROM current_ratings "
            "GROUP BY tenant_id ORDER BY tenant_id"
        )
        return {tenant: int(seconds) for tenant, seconds in rows}

    # -- catalog revisions, final invoices, adjustments (issue 4) -------------------------------------
    def max_catalog_revision(self) -> int:
        rows = self.query(
            "SELECT greatest((SELECT max(revision) FROM catalogs), "
            "(SELECT max(catalog_revision) FROM rated_calls))"
        )
        return int(rows[0][0] or 0)

    def catalog_body(self, revision: int) -> tuple[str, str] | None:
        rows = self.query(
            "SELECT sha256, body FROM catalogs FINAL WHERE revision = {r:UInt32}", {"r": revision}
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def invoice_rows(self, tenant_id: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Current row per invoice id (FINAL), newest generation."""
        where = []
        params: dict[str, Any] = {}
        if tenant_id:
            where.append("tenant_id = {t:String}")
            params["t"] = tenant_id
        if status:
            where.append("status = {s:String}")
            params["s"] = status
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        names = (
            "invoice_id",
            "tenant_id",
            "period_start",
            "period_end",
            "plan_id",
            "catalog_revision",
            "subtotal",
            "total",
            "body",
            "status",
            "generated_at",
        )
        rows = self.query(
            f"SELECT {', '.join(names)} FROM invoices FINAL {clause} ORDER BY tenant_id, period_start",  # noqa: S608
            params or None,
        )
        return [dict(zip(names, row, strict=True)) for row in rows]

    def finalized_periods(self) -> set[tuple[str, datetime]]:
        rows = self.query("SELECT tenant_id, period_start FROM invoices FINAL WHERE status = 'final'")
        return {(str(t), datetime(d.year, d.month, d.day, tzinfo=UTC)) for t, d in rows}

    def carried_adjustments(self, corrects_invoice_id: str, excluding_carrier: str) -> Decimal:
        """Adjustments for an invoice already carried by *final* invoices (drafts may still change)."""
        rows = self.query(
            "SELECT sum(amount) FROM adjustments FINAL WHERE corrects_invoice_id = {c:String} "
            "AND status = 'final' AND carried_on_invoice_id != {x:String}",
            {"c": corrects_invoice_id, "x": excluding_carrier},
        )
        return Decimal(rows[0][0] or 0)

    def raw_calls(
        self, started_from: datetime, started_to: datetime, tenant_id: str | None
    ) -> list[tuple[str, int, int]]:
        """(payload JSON, source partition, source offset) of every deduplicated call that started in
        [from, to): replay's source once the topic's retention no longer covers the range."""
        tenant_clause = "AND tenant_id = {t:String}" if tenant_id else ""
        rows = self.query(
            "SELECT payload, source_partition, source_offset FROM raw_events FINAL "  # noqa: S608
            "WHERE topic = 'calls' AND event_time >= {f:DateTime64(3, 'UTC')} "
            f"AND event_time < {{u:DateTime64(3, 'UTC')}} {tenant_clause} "
            "ORDER BY tenant_id, event_time, event_id",
            {"f": started_from, "u": started_to, "t": tenant_id},
        )
        return [(str(p), int(part), int(off)) for p, part, off in rows]

    def current_ratings(
        self, started_from: datetime, started_to: datetime, tenant_id: str | None
    ) -> dict[tuple[str, str], tuple[int, int, datetime]]:
        """(tenant, event) -> (billable seconds, catalog revision, period start) of each call's current
        rating, for calls that started in [from, to)."""
        tenant_clause = "AND tenant_id = {t:String}" if tenant_id else ""
        rows = self.query(
            "SELECT tenant_id, event_id, argMax(billable_seconds, catalog_revision), max(catalog_revision), "  # noqa: S608
            "argMax(period_start, catalog_revision) FROM rated_calls "
            "WHERE started_at >= {f:DateTime64(3, 'UTC')} AND started_at < {u:DateTime64(3, 'UTC')} "
            f"{tenant_clause} GROUP BY tenant_id, event_id",
            {"f": started_from, "u": started_to, "t": tenant_id},
        )
        return {(t, e): (int(b), int(r), as_utc(p)) for t, e, b, r, p in rows}

    def write_rows(self, table: str, rows: Iterable[Sequence[Any]], dedup_token: str | None = None) -> None:
        for row in rows:
            self.add(table, row)
        self.flush(dedup_token)


def as_utc(value: datetime) -> datetime:
    """chdb may hand back naive datetimes for UTC columns; everything here is UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
