"""The invoice job: invoices from the ledger, written as files and back to the ledger (job.py),
the completeness check before it (completeness.py)."""
