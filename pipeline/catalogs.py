"""Reading a catalog file (spec §3); what the ledger keeps of each revision is sinks/catalogs.py."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputError
from rating.catalog import Catalog, parse_catalog


def read_catalog(path: Path) -> tuple[Catalog, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"cannot read catalog {path}: {exc.strerror or exc}"
        raise InputError(msg) from exc
    return parse_catalog(text), text
