"""The tenant-facing read API: pre-call authorization, quota checks and balances answered
outside the stream worker's event loop, from a view of the committed changelogs (view.py, server.py),
and the answers themselves, shared with the worker's own endpoints (answers.py)."""
