"""The repository's documents against the code they describe."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from rating.invoice import invoice_id
from rating.periods import Period

ROOT = Path(__file__).resolve().parents[2]


def test_ledger_doc_gives_the_invoice_id_the_job_makes() -> None:
    period = Period(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    made = invoice_id("tenant-0001", period)
    assert made == "tenant-0001-20261101"
    (row,) = [
        line
        for line in (ROOT / "docs" / "ledger.md").read_text().splitlines()
        if line.startswith("| `invoices`")
    ]
    assert f"`{made}`" in row
    assert "`<tenant_id>-<YYYYMMDD of the period start>`" in row
    assert not re.search(r"YYYY-MM-DD", row)
