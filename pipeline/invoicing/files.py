"""What the invoice job writes: ``<invoice_id>.json`` files and the ledger's invoice rows.

pipeline/invoicing/job.py decides the invoices (``run_invoices``); this module renders them as JSON
and stores them: new drafts and finals with their lines, adjustments and credits, while a final invoice
already stored is written out again byte for byte and never stored twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from rating.invoice import Invoice, decimal_text
from sinks.ledger import Ledger


@dataclass(frozen=True)
class InvoiceOutput:
    invoice: Invoice
    text: str  # the JSON written to <invoice_id>.json
    status: str  # draft | final
    stored: bool  # True: a final invoice re-emitted from storage, not recomputed
    # (corrects invoice id, amount before tax, reason): charges (> 0) and credits (< 0, in invoice.credits)
    adjustments: tuple[tuple[str, Decimal, str], ...] = ()


def invoice_json(invoice: Invoice, generated_at: datetime, incomplete: bool = False) -> str:
    body = invoice.to_json_dict(generated_at.isoformat(timespec="seconds").replace("+00:00", "Z"))
    if incomplete:
        body["incomplete"] = True
    return json.dumps(body, indent=2) + "\n"


def write_outputs(ledger: Ledger, outputs: list[InvoiceOutput], out_dir: Path) -> list[Path]:
    """Write ``<invoice_id>.json`` files; store new drafts and new finals with their lines and
    adjustments. A stored final invoice is written out again byte for byte and never stored again."""
    out_dir.mkdir(parents=True, exist_ok=True)
    generated_at = datetime.now(UTC)
    paths = []
    for output in outputs:
        invoice = output.invoice
        path = out_dir / f"{invoice.invoice_id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(output.text)
        tmp.replace(path)
        paths.append(path)
        if output.stored:
            continue
        body: dict[str, Any] = json.loads(output.text)
        ledger.add(
            "invoices",
            {
                "invoice_id": invoice.invoice_id,
                "tenant_id": invoice.tenant_id,
                "period_start": invoice.period.start.date(),
                "period_end": invoice.period.end.date(),
                "plan_id": invoice.plan_id,
                "catalog_revision": invoice.catalog_revision,
                "currency": invoice.currency,
                "subtotal": invoice.subtotal,
                "tax": invoice.tax,
                "total": invoice.total,
                "body": output.text,
                "generated_at": generated_at,
                "status": output.status,
                "credit_applied": invoice.customer_credit.applied,
            },
        )
        for line_no, line in enumerate(body["lines"]):
            ledger.add(
                "invoice_lines",
                {
                    "invoice_id": invoice.invoice_id,
                    "line_no": line_no,
                    "code": line["code"],
                    "description": line.get("description", ""),
                    "number": line.get("number"),
                    "quantity": line["quantity"],
                    "unit_price": line["unit_price"],
                    "amount": line["amount"],
                    "generated_at": generated_at,
                },
            )
        credits = {credit.corrects_invoice: credit for credit in invoice.credits}
        for corrects, amount, why in output.adjustments:
            credit = credits.get(corrects)
            kind, tax_rate, tax = (
                ("credit", decimal_text(credit.tax_rate), credit.tax) if credit else ("charge", "", 0)
            )
            ledger.add(
                "adjustments",
                {
                    "carried_on_invoice_id": invoice.invoice_id,
                    "corrects_invoice_id": corrects,
                    "tenant_id": invoice.tenant_id,
                    "amount": amount,
                    "reason": why,
                    "catalog_revision": invoice.catalog_revision,
                    "status": output.status,
                    "generated_at": generated_at,
                    "kind": kind,
                    "tax_rate": tax_rate,
                    "tax": tax,
                },
            )
    ledger.flush()
    return paths
