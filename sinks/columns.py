"""The ledger tables' columns, in the order rows are added (``Ledger.add``) and inserted.

A column added by a migration (sinks/schema.py) is appended here too, at the end of its table's tuple.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sinks.errors import LedgerError

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
    "value_digest",
    "tenant_id",
    "event_id",
    "gateway_id",
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
    "kind",
    "tax_rate",
    "tax",
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
    "credit_applied",
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

DUPLICATE_COLUMNS = (
    "source_topic",
    "source_partition",
    "source_offset",
    "kind",
    "tenant_id",
    "event_id",
    "gateway_id",
    "event_time",
    "detected_by",
    "detected_at",
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

Values = Mapping[str, Any]


def ordered(table: str, values: Values) -> list[Any]:
    """A row of ``table`` in insert order from its values by column name: a missing or unknown column
    is a LedgerError naming it, never a value landing in the wrong column."""
    names = COLUMNS[table]
    if values.keys() != set(names):
        missing = sorted(set(names) - values.keys())
        unknown = sorted(values.keys() - set(names))
        msg = f"a {table} row needs exactly its columns: missing {missing}, unknown {unknown}"
        raise LedgerError(msg)
    return [values[name] for name in names]


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
    "duplicates": DUPLICATE_COLUMNS,
}
