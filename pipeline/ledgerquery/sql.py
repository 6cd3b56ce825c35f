"""Read-only SQL over the ledger (`callmeter sql`, usage, status): embedded or server, whether the
pipeline runs or not, and never at the expense of the sink's writes.

The embedded engine (chdb) opens a path in one process only, so while the pipeline runs, the process
holding the ledger (the worker's sink, or the sink process) serves queries on a loopback port it
announces in ``<ledger path>.query.json`` (sinks/sql_server.py). ``open_query`` asks that process when
the file names a live one, and otherwise runs the query here, in a read-only session of its own
(sinks/readonly.py: limits, refusals, sessions).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sinks.errors import LedgerError
from sinks.readonly import (
    QueryLimits,
    QueryStream,
    Result,
    encode_parameters,
    endpoint_file,
    error_from_json,
    limits_to_json,
    local_query,
)


@contextmanager
def open_query(
    dsn: str,
    password: str | None,
    sql: str,
    limits: QueryLimits | None = None,
    parameters: dict[str, Any] | None = None,
) -> Iterator[QueryStream]:
    """Run ``sql`` read-only against the ledger at ``dsn`` (through the process holding it if any)."""
    limits = limits or QueryLimits()
    announced = endpoint_file(dsn)
    if announced is not None and announced.exists():
        endpoint = _live_holder(announced)
        if endpoint is not None:
            with _ask_holder(endpoint, sql, parameters, limits) as stream:
                yield stream
            return
    with local_query(dsn, password, sql, limits, parameters) as stream:
        yield stream


def run_sql(
    dsn: str,
    password: str | None,
    sql: str,
    timeout_seconds: float = 300.0,
    parameters: dict[str, Any] | None = None,
) -> Result:
    """Every row of a read-only query, for the commands' own queries (small answers, no row limit)."""
    with open_query(dsn, password, sql, QueryLimits(max_seconds=timeout_seconds), parameters) as stream:
        return stream.columns, list(stream.rows)


def _live_holder(announced: Path) -> dict[str, Any] | None:
    """The holder's pid and port, or None when the file is stale (its process is gone)."""
    try:
        endpoint: dict[str, Any] = json.loads(announced.read_text())
        os.kill(int(endpoint["pid"]), 0)
        int(endpoint["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return endpoint


@contextmanager
def _ask_holder(
    endpoint: dict[str, Any], sql: str, parameters: dict[str, Any] | None, limits: QueryLimits
) -> Iterator[QueryStream]:
    """The holder's answer, one JSON line at a time (sinks/sql_server.py writes them)."""
    body = {"query": sql, "parameters": encode_parameters(parameters or {}), "limits": limits_to_json(limits)}
    request = urllib.request.Request(
        f"http://127.0.0.1:{int(endpoint['port'])}/sql", data=json.dumps(body).encode(), method="POST"
    )
    where = f"the process holding the ledger (pid {endpoint['pid']})"
    try:
        # The engine stops the query at max_seconds; the margin covers starting it and the transfer.
        response = urllib.request.urlopen(request, timeout=limits.max_seconds + 30)  # noqa: S310
    except urllib.error.HTTPError as exc:
        try:
            error = error_from_json(json.loads(exc.read()))
        except ValueError:
            error = LedgerError(str(exc))
        raise error from exc
    except (urllib.error.URLError, OSError) as exc:
        msg = f"{where} did not answer: {exc}"
        raise LedgerError(msg) from exc
    with response:
        try:
            head = json.loads(response.readline())
        except (OSError, ValueError) as exc:
            msg = f"{where} sent no answer: {exc}"
            raise LedgerError(msg) from exc
        yield QueryStream(list(head["columns"]), _lines(response, where), limits.max_rows)


def _lines(response: Any, where: str) -> Iterator[list[Any]]:
    while True:
        try:
            line = response.readline()
        except OSError as exc:
            msg = f"{where} stopped answering mid-result: {exc}"
            raise LedgerError(msg) from exc
        if not line:
            msg = f"{where} stopped answering mid-result"
            raise LedgerError(msg)
        item = json.loads(line)
        if isinstance(item, list):
            yield item
        elif "error" in item:
            raise error_from_json(item)
        else:
            return  # {"end": rows}
