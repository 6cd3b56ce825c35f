"""Small JSON-lines event builders for the integration tests (spec §1 field names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rating.batch import invoices_for_month
from rating.catalog import Catalog
from tests.integration.cli import EXAMPLES, reference_events


def prov(event_id: str, tenant: str, at: str, action: str, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "provisioning",
        "event_id": event_id,
        "tenant_id": tenant,
        "occurred_at": at,
        "action": action,
        "plan_id": None,
        "tax_region": None,
        "number": None,
        "number_type": None,
        "employee_id": None,
    }
    event.update(extra)
    return event


def call(
    event_id: str, tenant: str, answered: str, seconds: float, employee: str | None = None
) -> dict[str, Any]:
    """An ANSWERED call that rang for one second and lasted ``seconds`` after it was answered."""
    from datetime import datetime, timedelta

    answered_at = datetime.fromisoformat(answered.replace("Z", "+00:00"))
    started_at = answered_at - timedelta(seconds=1)
    ended_at = answered_at + timedelta(seconds=seconds)

    def iso(ts: datetime) -> str:
        return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    return {
        "type": "call",
        "event_id": event_id,
        "tenant_id": tenant,
        "call_id": f"c-{event_id}",
        "employee_id": employee,
        "direction": "INBOUND",
        "from_number": "+15550000001",
        "to_number": "+15550000002",
        "started_at": iso(started_at),
        "answered_at": iso(answered_at),
        "ended_at": iso(ended_at),
        "disposition": "ANSWERED",
        "gateway_id": "gw-1",
    }


def write_events(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def example_catalog() -> Catalog:
    from pipeline.catalogs import read_catalog

    return read_catalog(EXAMPLES / "catalog.yaml")[0]


def reference_invoices(
    paths: list[Path], year: int, month: int, catalog: Catalog
) -> dict[str, dict[str, Any]]:
    """rating/'s batch computation over every event of the files, in file order (first seen wins),
    as invoice JSON bodies without generated_at and descriptions."""
    from tests.integration.cli import comparable

    calls: list[Any] = []
    provisioning: list[Any] = []
    for path in paths:
        c, p = reference_events(path)
        calls += c
        provisioning += p
    out = {}
    for invoice in invoices_for_month(calls, provisioning, catalog, year, month):
        out[invoice.invoice_id] = comparable(invoice.to_json_dict("x"))
    return out
