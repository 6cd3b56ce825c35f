"""Catalog revisions against the ledger (spec §3, §9).

Every revision the ledger uses is stored verbatim in the ``catalogs`` table, so:
- a catalog older than the newest revision already in the ledger is refused (ratings only move forward);
- one revision number can never stand for two different catalogs (a price change without raising
  ``revision`` is refused instead of silently mixing two price lists under one number);
- old charges can be recomputed with the exact catalog that produced them.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from rating.catalog import Catalog, parse_catalog
from rating.errors import CatalogError
from sinks.ledger import Ledger


def register_catalog(ledger: Ledger, catalog: Catalog, text: str) -> None:
    newest = ledger.max_catalog_revision()
    if catalog.revision < newest:
        msg = (
            f"catalog revision {catalog.revision} is older than revision {newest} already in the ledger; "
            f"load revision {newest} or later"
        )
        raise CatalogError(msg)
    digest = hashlib.sha256(text.encode()).hexdigest()
    stored = ledger.catalog_body(catalog.revision)
    if stored is not None:
        if stored[0] != digest:
            msg = (
                f"catalog revision {catalog.revision} differs from the revision {catalog.revision} "
                "the ledger already used; raise `revision` for every change"
            )
            raise CatalogError(msg)
        return
    row = {"revision": catalog.revision, "sha256": digest, "body": text, "loaded_at": datetime.now(UTC)}
    ledger.write_rows("catalogs", [row])


def catalog_at_revision(ledger: Ledger, revision: int, current: Catalog) -> Catalog:
    """The catalog that rated with ``revision`` (the current one when it is that revision or unknown)."""
    if revision == current.revision or revision <= 0:
        return current
    stored = ledger.catalog_body(revision)
    return parse_catalog(stored[1]) if stored else current
