"""The ledger's versioned DDL (sinks/ledger.py applies it; the columns rows are written in are in
sinks/columns.py).

Append a migration to change the schema; never edit an applied one.
"""

from __future__ import annotations

TS = "DateTime64(3, 'UTC')"
_REPLACING = "SETTINGS non_replicated_deduplication_window = 1000"

# Versioned DDL: append a new entry to change the schema; never edit an applied one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "ledger tables",
        [
            f"""CREATE TABLE IF NOT EXISTS raw_events (
                topic LowCardinality(String), tenant_id String, event_id String,
                event_type LowCardinality(String), event_time {TS}, payload String,
                source_partition UInt32, source_offset UInt64, ingested_at {TS}
            ) ENGINE = ReplacingMergeTree ORDER BY (topic, tenant_id, event_id) {_REPLACING}""",
            f"""CREATE TABLE IF NOT EXISTS rated_calls (
                tenant_id String, event_id String, call_id String, employee_id Nullable(String),
                direction LowCardinality(String), from_number String, to_number String,
                started_at {TS}, answered_at Nullable({TS}), ended_at {TS},
                disposition LowCardinality(String), gateway_id LowCardinality(String),
                period_start {TS}, period_end {TS}, plan_id LowCardinality(String),
                raw_seconds Decimal(18, 3), billable_seconds UInt64, catalog_revision UInt32,
                late UInt8, rated_at {TS}, source_partition UInt32, source_offset UInt64
            ) ENGINE = ReplacingMergeTree ORDER BY (tenant_id, event_id, catalog_revision) {_REPLACING}""",
            f"""CREATE TABLE IF NOT EXISTS provisioning_events (
                tenant_id String, event_id String, occurred_at {TS}, action LowCardinality(String),
                plan_id Nullable(String), tax_region Nullable(String), number Nullable(String),
                number_type Nullable(String), employee_id Nullable(String),
                source_partition UInt32, source_offset UInt64
            ) ENGINE = ReplacingMergeTree ORDER BY (tenant_id, event_id) {_REPLACING}""",
            f"""CREATE TABLE IF NOT EXISTS dead_letters (
                source_topic LowCardinality(String), source_partition UInt32, source_offset UInt64,
                reason LowCardinality(String), message String, key Nullable(String), value_hex String,
                failed_at {TS}
            ) ENGINE = ReplacingMergeTree ORDER BY (source_topic, source_partition, source_offset)
            {_REPLACING}""",
            f"""CREATE TABLE IF NOT EXISTS invoices (
                invoice_id String, tenant_id String, period_start Date, period_end Date,
                plan_id String, catalog_revision UInt32, currency String, subtotal Decimal(18, 2),
                tax Decimal(18, 2), total Decimal(18, 2), body String, generated_at {TS}
            ) ENGINE = ReplacingMergeTree(generated_at) ORDER BY (invoice_id)""",
            f"""CREATE TABLE IF NOT EXISTS invoice_lines (
                invoice_id String, line_no UInt16, code LowCardinality(String), description String,
                number Nullable(String), quantity String, unit_price String, amount Decimal(18, 2),
                generated_at {TS}
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
                revision UInt32, sha256 String, body String, loaded_at {TS}
            ) ENGINE = ReplacingMergeTree ORDER BY revision""",
            f"""CREATE TABLE IF NOT EXISTS adjustments (
                carried_on_invoice_id String, corrects_invoice_id String, tenant_id String,
                amount Decimal(18, 2), reason String, catalog_revision UInt32,
                status LowCardinality(String), generated_at {TS}
            ) ENGINE = ReplacingMergeTree(generated_at)
            ORDER BY (carried_on_invoice_id, corrects_invoice_id)""",
        ],
    ),
    (
        3,
        "rating corrections and each call's current rating",
        [
            # The invoice job rates every call against the tenant's whole provisioning history.
            # Where that differs from the stream's rating (provisioning consumed after the call), it
            # appends a correction here; nothing in rated_calls is edited. period_start is NULL when no
            # subscription covers the call any more (billable 0).
            f"""CREATE TABLE IF NOT EXISTS rating_corrections (
                tenant_id String, event_id String, period_start Nullable({TS}),
                plan_id LowCardinality(String), billable_seconds UInt64, catalog_revision UInt32,
                reason String, corrected_at {TS}
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
    (
        4,
        "dead letters keyed by content as well as source offset",
        [
            # A fresh Kafka cluster starts its offsets at 0 again: a new dead letter at an offset an old
            # one had must be a second row, not replace the first. Rows from before have digest 0.
            "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS value_digest UInt64, "
            "MODIFY ORDER BY (source_topic, source_partition, source_offset, value_digest)",
        ],
    ),
    (
        5,
        "analyst views: money read through FINAL/argMax so a query cannot count a copy twice",
        [
            # Every call once, with its current rating (current_ratings) and the call's own fields.
            """CREATE VIEW IF NOT EXISTS call_ratings AS
            SELECT r.tenant_id AS tenant_id, r.event_id AS event_id, d.call_id AS call_id,
                   d.employee_id AS employee_id, d.direction AS direction, d.gateway_id AS gateway_id,
                   d.started_at AS started_at, d.answered_at AS answered_at, d.ended_at AS ended_at,
                   d.disposition AS disposition, d.raw_seconds AS raw_seconds,
                   r.period_start AS period_start, r.plan_id AS plan_id,
                   r.billable_seconds AS billable_seconds, r.catalog_revision AS catalog_revision,
                   r.corrected AS corrected, r.correction_reason AS correction_reason, d.late AS late
            FROM current_ratings AS r
            INNER JOIN (
                SELECT tenant_id, event_id, any(call_id) AS call_id, any(employee_id) AS employee_id,
                       any(direction) AS direction, any(gateway_id) AS gateway_id,
                       any(started_at) AS started_at, any(answered_at) AS answered_at,
                       any(ended_at) AS ended_at, any(disposition) AS disposition,
                       any(raw_seconds) AS raw_seconds, max(late) AS late
                FROM rated_calls GROUP BY tenant_id, event_id
            ) AS d ON r.tenant_id = d.tenant_id AND r.event_id = d.event_id""",
            # Calls and seconds per tenant and UTC day the call started.
            """CREATE VIEW IF NOT EXISTS usage_daily AS
            SELECT tenant_id, toDate(started_at, 'UTC') AS day, count() AS calls,
                   sum(billable_seconds) AS billable_seconds, sum(raw_seconds) AS connected_seconds
            FROM call_ratings GROUP BY tenant_id, day""",
            # Each invoice as last generated (draft or final) and its lines of that generation.
            """CREATE VIEW IF NOT EXISTS latest_invoices AS
            SELECT invoice_id, tenant_id, period_start, period_end, plan_id, catalog_revision, currency,
                   subtotal, tax, total, status, generated_at
            FROM invoices FINAL""",
            """CREATE VIEW IF NOT EXISTS latest_invoice_lines AS
            SELECT l.invoice_id AS invoice_id, i.tenant_id AS tenant_id, i.period_start AS period_start,
                   l.line_no AS line_no, l.code AS code, l.description AS description,
                   l.number AS number, l.quantity AS quantity, l.unit_price AS unit_price,
                   l.amount AS amount
            FROM invoice_lines AS l FINAL
            INNER JOIN latest_invoices AS i
                ON l.invoice_id = i.invoice_id AND l.generated_at = i.generated_at""",
            # Per tenant and billing period: live usage from the ledger, and the allowance split from
            # the period's latest invoice (zero and invoiced = 0 until one is generated).
            """CREATE VIEW IF NOT EXISTS usage_by_period AS
            SELECT u.tenant_id AS tenant_id, u.ps AS period_start, u.plan AS plan_id,
                   u.n AS calls, u.billable AS billable_seconds,
                   v.invoice_id != '' AS invoiced, v.status AS invoice_status,
                   v.included_seconds AS included_seconds, v.overage_seconds AS overage_seconds,
                   v.blocked_seconds AS blocked_seconds
            FROM (
                SELECT tenant_id, assumeNotNull(period_start) AS ps, any(plan_id) AS plan,
                       count() AS n, sum(billable_seconds) AS billable
                FROM call_ratings WHERE period_start IS NOT NULL GROUP BY tenant_id, ps
            ) AS u
            LEFT JOIN (
                SELECT i.tenant_id AS tenant_id, i.period_start AS period_start,
                       i.invoice_id AS invoice_id, i.status AS status,
                       sumIf(toUInt64OrZero(l.quantity), l.code = 'included_seconds') AS included_seconds,
                       sumIf(toUInt64OrZero(l.quantity), l.code = 'overage_seconds') AS overage_seconds,
                       sumIf(toUInt64OrZero(l.quantity), l.code = 'blocked_overage_seconds')
                           AS blocked_seconds
                FROM latest_invoices AS i
                LEFT JOIN latest_invoice_lines AS l ON l.invoice_id = i.invoice_id
                GROUP BY i.tenant_id, i.period_start, i.invoice_id, i.status
            ) AS v ON u.tenant_id = v.tenant_id AND toDate(u.ps, 'UTC') = v.period_start""",
            # Invoiced money per period start and plan, by invoice status (draft | final).
            """CREATE VIEW IF NOT EXISTS revenue_by_plan AS
            SELECT period_start, plan_id, status, currency, count() AS invoices,
                   sum(subtotal) AS subtotal, sum(tax) AS tax, sum(total) AS total
            FROM latest_invoices GROUP BY period_start, plan_id, status, currency""",
            # Corrections of final invoices, carried on later invoices, with their reasons.
            """CREATE VIEW IF NOT EXISTS adjustments_current AS
            SELECT carried_on_invoice_id, corrects_invoice_id, tenant_id, amount, reason,
                   catalog_revision, status, generated_at
            FROM adjustments FINAL""",
            """CREATE VIEW IF NOT EXISTS dead_letters_by_reason AS
            SELECT source_topic, reason, count() AS dead_letters, min(failed_at) AS first_at,
                   max(failed_at) AS last_at
            FROM dead_letters FINAL GROUP BY source_topic, reason""",
        ],
    ),
    (
        6,
        "duplicates and dead letters by gateway and tenant",
        [
            # What a dead letter's original bytes say, when they decode: '' for undecodable records and
            # for provisioning events (no gateway). Rows from before have ''.
            "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS tenant_id String DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS event_id String DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS gateway_id LowCardinality(String) DEFAULT ''",
            # Every copy of an event already processed: found by the worker (idempotency key in its
            # state, detected_by 'worker') or by the ledger sink (a key the ledger already holds from
            # another source record, 'ledger'). detected_at comes from the Kafka record, so a batch the
            # sink writes again collapses onto the same rows.
            f"""CREATE TABLE IF NOT EXISTS duplicates (
                source_topic LowCardinality(String), source_partition UInt32, source_offset UInt64,
                kind LowCardinality(String), tenant_id String, event_id String,
                gateway_id LowCardinality(String), event_time {TS},
                detected_by LowCardinality(String), detected_at {TS}
            ) ENGINE = ReplacingMergeTree
            ORDER BY (source_topic, source_partition, source_offset, tenant_id, event_id, detected_at)
            {_REPLACING}""",
            """CREATE VIEW IF NOT EXISTS dead_letters_by_gateway AS
            SELECT source_topic, reason, gateway_id, count() AS dead_letters,
                   min(failed_at) AS first_at, max(failed_at) AS last_at
            FROM dead_letters FINAL GROUP BY source_topic, reason, gateway_id""",
            """CREATE VIEW IF NOT EXISTS duplicates_by_gateway AS
            SELECT kind, gateway_id, count() AS duplicates,
                   countIf(detected_by = 'ledger') AS found_by_ledger,
                   min(detected_at) AS first_at, max(detected_at) AS last_at
            FROM duplicates FINAL GROUP BY kind, gateway_id""",
        ],
    ),
    (
        7,
        "customer credit: corrections that lower a final invoice, and what invoices apply of it",
        [
            # kind 'charge': an adjustment line on its carrier invoice, taxed within the carrier's
            # subtotal (tax_rate '' and tax 0 here, as every row before). kind 'credit': customer credit,
            # never a line (rating/credit.py): amount before tax at the tax_rate of the invoice it
            # corrects; worth -(amount + tax) to the tenant.
            "ALTER TABLE adjustments ADD COLUMN IF NOT EXISTS kind LowCardinality(String) DEFAULT 'charge', "
            "ADD COLUMN IF NOT EXISTS tax_rate String DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS tax Decimal(18, 2) DEFAULT 0",
            # The customer credit an invoice applied: what is due is total - credit_applied.
            "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS credit_applied Decimal(18, 2) DEFAULT 0",
            # Per tenant and final invoice: the credit it granted and the credit it applied. A tenant's
            # balance is sum(granted) - sum(applied); drafts count for nothing until they are final.
            """CREATE VIEW IF NOT EXISTS customer_credit AS
            SELECT tenant_id, invoice_id, sum(granted) AS granted, sum(applied) AS applied FROM (
                SELECT tenant_id, carried_on_invoice_id AS invoice_id, -(amount + tax) AS granted,
                       toDecimal64(0, 2) AS applied
                FROM adjustments FINAL WHERE kind = 'credit' AND status = 'final'
                UNION ALL
                SELECT tenant_id, invoice_id, toDecimal64(0, 2) AS granted, credit_applied AS applied
                FROM invoices FINAL WHERE status = 'final'
            ) GROUP BY tenant_id, invoice_id""",
            # The views of migration 5 with the new columns: each adjustment's kind and tax; what each
            # invoice applied of the tenant's credit and what it leaves due; and per period and plan,
            # the credits granted on those invoices (before tax, <= 0: net revenue is subtotal +
            # credited), read from each invoice's latest generation only.
            """CREATE OR REPLACE VIEW adjustments_current AS
            SELECT carried_on_invoice_id, corrects_invoice_id, tenant_id, kind, amount, tax_rate, tax,
                   reason, catalog_revision, status, generated_at
            FROM adjustments FINAL""",
            """CREATE OR REPLACE VIEW latest_invoices AS
            SELECT invoice_id, tenant_id, period_start, period_end, plan_id, catalog_revision, currency,
                   subtotal, tax, total, credit_applied, total - credit_applied AS amount_due, status,
                   generated_at
            FROM invoices FINAL""",
            """CREATE OR REPLACE VIEW revenue_by_plan AS
            SELECT i.period_start AS period_start, i.plan_id AS plan_id, i.status AS status,
                   i.currency AS currency, count() AS invoices, sum(i.subtotal) AS subtotal,
                   sum(i.tax) AS tax, sum(i.total) AS total, sum(c.amount) AS credited,
                   sum(c.tax) AS credited_tax, sum(i.credit_applied) AS credit_applied
            FROM latest_invoices AS i
            LEFT JOIN (
                SELECT carried_on_invoice_id, generated_at, sum(amount) AS amount, sum(tax) AS tax
                FROM adjustments FINAL WHERE kind = 'credit'
                GROUP BY carried_on_invoice_id, generated_at
            ) AS c ON c.carried_on_invoice_id = i.invoice_id AND c.generated_at = i.generated_at
            GROUP BY period_start, plan_id, status, currency""",
        ],
    ),
]
