"""The ledger a writing process opens: migrated, with the catalog revision it rates with recorded."""

from __future__ import annotations

from pipeline.settings import Settings
from rating.catalog import Catalog
from sinks.catalogs import register_catalog
from sinks.ledger import Ledger


def open_ledger(settings: Settings, catalog: Catalog, catalog_text: str) -> Ledger:
    """Open (and migrate) the ledger and record the catalog revision in use (refused when older than
    one the ledger has used). Stream workers with a sink thread and the sink process both start here."""
    ledger = Ledger.open(settings.clickhouse_dsn, settings.clickhouse_secret, settings.clickhouse_cluster)
    if catalog_text:
        try:
            register_catalog(ledger, catalog, catalog_text)
        except Exception:
            ledger.close()
            raise
    return ledger
