"""The ClickHouse ledger behind a small port: ``add()`` rows, ``flush()`` them, query what invoices need.

How redelivery is kept from counting twice (the sink may write a batch again after a crash between the
ClickHouse insert and its Kafka offset commit):

1. Every table is a ReplacingMergeTree whose sorting key is the record's identity — ``(tenant_id,
   event_id, catalog_revision)`` for rated calls, ``(topic, tenant_id, event_id)`` for raw events — so
   copies of one record collapse to one row.
2. Collapsing happens only at merge time, so every query that counts money reads through ``FINAL`` or
   ``argMax(..., catalog_revision)`` grouped by the identity: a not-yet-merged copy is never summed.
3. Inserts carry an ``insert_deduplication_token`` built from the batch's source offsets *and* content
   (offsets alone repeat on a fresh Kafka cluster, and ClickHouse would silently drop the new batch),
   and the tables raise ``non_replicated_deduplication_window``, so the common case (the same batch
   resent whole) is refused at insert time and never even reaches a merge. On a cluster
   (``cluster``, sinks/cluster.py) the tables are Replicated with ``replicated_deduplication_window``
   and the token reaches each shard with that shard's part of the batch, which a resent batch splits
   into identically (the sharding key is a function of each row's identity); inserts are synchronous
   and quorum-acknowledged, so ``flush()`` returns only once every shard holds its rows.
4. First seen wins (spec §2). The stream's dedupe state does not outlive a fresh cluster or a key's
   retention, so before inserting, the sink asks ``known_events`` whether a key is already in
   ``raw_events`` from another source record; such a copy is a duplicate: only a ``duplicates`` row
   (detected_by 'ledger') is written for it, never a billing row. A row an
   invoice used is therefore never replaced, whatever the payload of a later copy.

The ledger is append-only (spec §9): a re-rating adds a row with a higher catalog revision; nothing
is updated or deleted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client

from sinks.cluster import cluster_ddl, cluster_migrations
from sinks.columns import COLUMNS, PROVISIONING_COLUMNS, Values, ordered
from sinks.connect import connect, one_line
from sinks.errors import LedgerError
from sinks.schema import MIGRATIONS, TS

log = logging.getLogger(__name__)

# Where migrate() records the versions applied (on a cluster: transformed like the migrations).
MIGRATIONS_TABLE_DDL = (
    f"CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
    f"applied_at {TS}) ENGINE = MergeTree ORDER BY version"
)


# What a tenant's timeline is rebuilt from: the provisioning event's own fields, not where it was read.
_TIMELINE_COLUMNS = tuple(c for c in PROVISIONING_COLUMNS if c not in ("source_partition", "source_offset"))


class Ledger:
    """Buffered writer and reader of the ledger tables."""

    def __init__(self, client: Client, cluster: str | None = None) -> None:
        self.client = client
        self.cluster = cluster
        # One client, shared by the sink's threads (inserts, the first-seen check, finalized periods).
        # Analysts' queries never use it: they get a client and session of their own (sinks/query.py).
        self.lock = threading.RLock()
        self._buffers: dict[str, list[Sequence[Any]]] = {name: [] for name in COLUMNS}

    @classmethod
    def open(cls, dsn: str, password: str | None = None, cluster: str | None = None) -> Ledger:
        ledger = cls(connect(dsn, password, cluster), cluster)
        ledger.migrate()
        return ledger

    def close(self) -> None:
        self.client.close()

    # -- schema ---------------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply every migration not yet recorded; return the versions applied now."""
        try:
            migrations, setup = MIGRATIONS, [MIGRATIONS_TABLE_DDL]
            if self.cluster:
                database = str(self.client.command("SELECT currentDatabase()"))
                migrations = cluster_migrations(MIGRATIONS, self.cluster, database)
                setup = cluster_ddl(MIGRATIONS_TABLE_DDL, self.cluster, database)
            for statement in setup:
                self.client.command(statement)
            done = {row[0] for row in self.client.query("SELECT version FROM schema_migrations").result_rows}
            applied = []
            for version, name, statements in migrations:
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
            msg = f"ledger migration failed: {one_line(exc)}"
            raise LedgerError(msg) from exc

    # -- the port -------------------------------------------------------------------------------------
    def add(self, table: str, values: Values) -> None:
        """One row, its values by column name (sinks/columns.py ``ordered``)."""
        self._buffers[table].append(ordered(table, values))

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
                with self.lock:
                    self.client.insert(table, rows, column_names=list(COLUMNS[table]), settings=settings)
            except Exception as exc:
                msg = f"ledger insert into {table} failed ({len(rows)} rows): {one_line(exc)}"
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
            with self.lock:
                return [tuple(r) for r in self.client.query(sql, parameters=parameters).result_rows]
        except Exception as exc:
            msg = f"ledger query failed: {one_line(exc)}"
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

    def known_events(
        self, keys: Iterable[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], list[tuple[int, int, str]]]:
        """``(topic, tenant, event) -> [(source partition, source offset, payload)]`` of the raw events
        already in the ledger under any of these keys: the sink's first-seen check (pipeline/ledger/sink.py).
        The filter on tenants and ids is a superset of the pairs; the exact pairs are kept here."""
        wanted = set(keys)
        if not wanted:
            return {}
        rows = self.query(
            "SELECT topic, tenant_id, event_id, source_partition, source_offset, payload FROM raw_events "
            "WHERE tenant_id IN {t:Array(String)} AND event_id IN {e:Array(String)}",
            {"t": sorted({k[1] for k in wanted}), "e": sorted({k[2] for k in wanted})},
        )
        out: dict[tuple[str, str, str], list[tuple[int, int, str]]] = {}
        for topic, tenant, event, partition, offset, payload in rows:
            key = (str(topic), str(tenant), str(event))
            if key in wanted:
                out.setdefault(key, []).append((int(partition), int(offset), str(payload)))
        return out

    def known_dead_letters(
        self, keys: Iterable[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], list[tuple[int, int, str]]]:
        """``(tag, source topic, value digest) -> [(source partition, source offset, "")]`` of the dead
        letters already in the ledger with these original bytes (the digest is ``value_digest``): the
        sink's first-seen check for dead letters, so a resent bad event is one dead letter."""
        wanted = set(keys)
        if not wanted:
            return {}
        rows = self.query(
            "SELECT source_topic, toString(value_digest), source_partition, source_offset FROM dead_letters "
            "WHERE value_digest IN {d:Array(UInt64)}",
            {"d": sorted({int(k[2]) for k in wanted})},
        )
        out: dict[tuple[str, str, str], list[tuple[int, int, str]]] = {}
        tag = next(iter(wanted))[0]
        for topic, digest, partition, offset in rows:
            key = (tag, str(topic), str(digest))
            if key in wanted and (int(partition), int(offset), "") not in out.get(key, []):
                out.setdefault(key, []).append((int(partition), int(offset), ""))
        return out

    def provisioning_rows(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        where = "WHERE tenant_id = {t:String}" if tenant_id else ""
        rows = self.query(
            # Only constant column names and a fixed WHERE are interpolated; the tenant is a parameter.
            f"SELECT {', '.join(_TIMELINE_COLUMNS)} FROM provisioning_events FINAL {where} "  # noqa: S608
            "ORDER BY tenant_id, occurred_at, event_id",
            {"t": tenant_id} if tenant_id else None,
        )
        out = []
        for row in rows:
            record = dict(zip(_TIMELINE_COLUMNS, row, strict=True))
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

    # -- catalog revisions, final invoices, adjustments -------------------------------------------
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

    def credit_balances(
        self, excluding_invoices: Sequence[str], tenant_id: str | None = None
    ) -> dict[str, Decimal]:
        """Each tenant's customer credit balance on its *final* invoices (drafts may still change),
        leaving out ``excluding_invoices``: the ones being computed, whose own credit is theirs to add."""
        rows = self.query(
            "SELECT tenant_id, sum(granted) - sum(applied) FROM customer_credit "
            "WHERE invoice_id NOT IN {x:Array(String)} AND ({t:String} = '' OR tenant_id = {t:String}) "
            "GROUP BY tenant_id",
            {"x": list(excluding_invoices), "t": tenant_id or ""},
        )
        return {str(tenant): Decimal(balance) for tenant, balance in rows}

    def insert_columns(
        self, table: str, by_name: Mapping[str, Sequence[Any]], dedup_token: str | None = None
    ) -> int:
        """Insert whole columns, by column name, at once: a bulk writer's path, where plain ints
        (DateTime64 as epoch millis) and strings skip the per-value conversions of ``flush``."""
        columns = ordered(table, by_name)
        settings = {"insert_deduplication_token": f"{dedup_token}:{table}"} if dedup_token else None
        try:
            with self.lock:
                self.client.insert(
                    table, columns, column_names=list(COLUMNS[table]), column_oriented=True, settings=settings
                )
        except Exception as exc:
            msg = f"ledger insert into {table} failed ({len(columns[0])} rows): {one_line(exc)}"
            raise LedgerError(msg) from exc
        return len(columns[0])

    def write_rows(self, table: str, rows: Iterable[Values], dedup_token: str | None = None) -> None:
        for values in rows:
            self.add(table, values)
        self.flush(dedup_token)


def as_utc(value: datetime) -> datetime:
    """chdb may hand back naive datetimes for UTC columns; everything here is UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
