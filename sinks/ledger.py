"""The ClickHouse ledger behind a small port: ``add()`` rows, ``flush()`` them.

What the sink itself must read is here too (the first-seen check of item 4, final periods, stored
catalog revisions); what invoices, replays and reports read is the ledger's read side,
pipeline/ledgerquery/reads.py.

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
from typing import Any

from clickhouse_connect.driver.client import Client

from sinks.cluster import cluster_ddl, cluster_migrations
from sinks.columns import COLUMNS, Values, ordered
from sinks.connect import connect, one_line
from sinks.errors import LedgerError
from sinks.schema import MIGRATIONS, TS

log = logging.getLogger(__name__)

# Where migrate() records the versions applied (on a cluster: transformed like the migrations).
MIGRATIONS_TABLE_DDL = (
    f"CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
    f"applied_at {TS}) ENGINE = MergeTree ORDER BY version"
)


class Ledger:
    """Buffered writer of the ledger tables, and the reads its own protocol needs."""

    def __init__(self, client: Client, cluster: str | None = None) -> None:
        self.client = client
        self.cluster = cluster
        # One client, shared by the sink's threads (inserts, the first-seen check, finalized periods).
        # Analysts' queries never use it: they get a client and session of their own
        # (pipeline/ledgerquery/sql.py).
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

    # -- what the sink reads ----------------------------------------------------------------------------
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        try:
            with self.lock:
                return [tuple(r) for r in self.client.query(sql, parameters=parameters).result_rows]
        except Exception as exc:
            msg = f"ledger query failed: {one_line(exc)}"
            raise LedgerError(msg) from exc

    def known_events(
        self, keys: Iterable[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], list[tuple[int, int, str]]]:
        """``(topic, tenant, event) -> [(source partition, source offset, payload)]`` of the raw events
        already in the ledger under any of these keys: the sink's first-seen check (sinks/sink.py).
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

    # -- catalog revisions, final periods -------------------------------------------------------------
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

    def finalized_periods(self) -> set[tuple[str, datetime]]:
        rows = self.query("SELECT tenant_id, period_start FROM invoices FINAL WHERE status = 'final'")
        return {(str(t), datetime(d.year, d.month, d.day, tzinfo=UTC)) for t, d in rows}

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
