"""Replay: re-rating a time range of calls under a new catalog revision, from Kafka or the ledger."""
