"""Typed errors of the ledger sink."""

from rating.errors import CallmeterError


class LedgerError(CallmeterError):
    """ClickHouse could not be reached, migrated or written."""
