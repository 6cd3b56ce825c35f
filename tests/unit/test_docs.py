"""The repository's documents against the code they describe."""

from __future__ import annotations

import re
import subprocess
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


def _tracked_files() -> list[Path]:
    """The repository's files as a fresh clone has them (git's index; untracked files are not shipped)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    return [ROOT / name.decode() for name in listed if name and (ROOT / name.decode()).is_file()]


# Built, not written out, so this file does not name what it looks for.
_OUTSIDE = [f"..{'/'}shared", f"shared{'/'}spec", f"/work{'/'}shared"]


def test_no_tracked_file_points_outside_the_repository() -> None:
    """A fresh clone has no shared spec beside it: the contract is docs/contract.md."""
    files = _tracked_files()
    assert len(files) > 100
    offending = sorted(
        f"{path.relative_to(ROOT)}: {needle}"
        for path in files
        for needle in _OUTSIDE
        if needle.encode() in path.read_bytes()
    )
    assert offending == []


def test_every_relative_link_in_the_docs_resolves() -> None:
    docs = [path for path in _tracked_files() if path.suffix == ".md"]
    assert ROOT / "docs" / "contract.md" in docs
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_contract_is_linked_and_has_every_section_the_code_cites() -> None:
    contract = (ROOT / "docs" / "contract.md").read_text()
    sections = [int(n) for n in re.findall(r"^## (\d+)\. ", contract, flags=re.MULTILINE)]
    assert sections == list(range(1, 11))
    assert "](docs/contract.md)" in (ROOT / "README.md").read_text()
    for doc in ("decisions.md", "rating.md"):
        assert "](contract.md)" in (ROOT / "docs" / doc).read_text(), doc
    cited = {
        int(n)
        for path in _tracked_files()
        if path.suffix in (".py", ".md", ".avsc")
        for n in re.findall(r"spec (?:§|section )(\d+)", path.read_text())
    }
    assert cited and cited <= set(sections)
