"""Read-only SQL over the ledger (`callmeter sql`): embedded or server, whether the pipeline runs or not.

Read-only is ClickHouse's own ``readonly = 1`` setting on every query, not a check of the text: the
server refuses anything that writes (INSERT, ALTER, DROP, CREATE, SET ...) whatever its spelling.

The embedded engine (chdb) opens a path in one process only, so while the pipeline runs, the process
holding the ledger (the worker's sink, or the sink process) serves read-only queries on a loopback
port it announces in ``<ledger path>.query.json`` (pid and port). ``run_sql`` asks that process when
the file names a live one, and opens the ledger itself otherwise. Queries and the sink's inserts take
turns on the one client (``Ledger.lock``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from sinks.errors import LedgerError
from sinks.ledger import Ledger, connect

log = logging.getLogger(__name__)
READONLY = {"readonly": 1}
Result = tuple[list[str], list[list[Any]]]
_MAX_QUERY_BYTES = 1_000_000


def readonly_query(client: Client, sql: str, parameters: dict[str, Any] | None = None) -> Result:
    """Column names and rows (JSON-ready values) of one read-only query; a refusal is a LedgerError.
    ``parameters`` fill ``{name:Type}`` placeholders server-side (never pasted into the text)."""
    try:
        result = client.query(sql, parameters=parameters, settings=READONLY)
    except Exception as exc:  # the driver raises many kinds; the caller needs one line
        raise LedgerError(_refusal(exc)) from exc
    return list(result.column_names), [[_plain(v) for v in row] for row in result.result_rows]


def _refusal(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "(READONLY)" in text or "Code: 164" in text:
        return "refused: the ledger is read-only here (SELECT, SHOW, DESCRIBE, EXPLAIN and WITH only)"
    # ClickHouse repeats "Code: n. DB::Exception:" prefixes; keep the message.
    message = text.split("DB::Exception:")[-1].strip() if "DB::Exception:" in text else text
    return f"query failed: {message[:500]}"


def _plain(value: Any) -> Any:
    """A JSON-ready value: money stays exact (Decimal as its string), times in ISO 8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        # Every time in the ledger is UTC; the embedded engine hands some back without a zone.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def endpoint_file(dsn: str) -> Path | None:
    """Where the holder of an embedded ledger announces its query port; None for a server."""
    if not dsn.startswith("chdb:"):
        return None
    return Path(dsn.removeprefix("chdb://").rstrip("/") + ".query.json")


def run_sql(
    dsn: str,
    password: str | None,
    sql: str,
    timeout_seconds: float = 300.0,
    parameters: dict[str, Any] | None = None,
) -> Result:
    """Run ``sql`` read-only against the ledger at ``dsn``, through the process holding it if any."""
    announced = endpoint_file(dsn)
    if announced is not None and announced.exists():
        served = _ask_holder(announced, sql, parameters, timeout_seconds)
        if served is not None:
            return served
    client = connect(dsn, password)
    try:
        return readonly_query(client, sql, parameters)
    finally:
        client.close()


def _ask_holder(
    announced: Path, sql: str, parameters: dict[str, Any] | None, timeout_seconds: float
) -> Result | None:
    """The holder's answer, or None when the file is stale (its process is gone)."""
    try:
        endpoint = json.loads(announced.read_text())
        os.kill(int(endpoint["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    request = urllib.request.Request(
        f"http://127.0.0.1:{int(endpoint['port'])}/sql",
        data=json.dumps({"query": sql, "parameters": parameters or {}}).encode(),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_seconds) as response:  # noqa: S310
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error", str(exc))
        except ValueError:
            error = str(exc)
        raise LedgerError(error) from exc
    except (urllib.error.URLError, OSError) as exc:
        msg = f"the process holding the ledger (pid {endpoint['pid']}) did not answer: {exc}"
        raise LedgerError(msg) from exc
    return list(body["columns"]), list(body["rows"])


class QueryServer:
    """Serves read-only queries on the ledger this process holds (embedded ledgers only)."""

    def __init__(self, ledger: Ledger, announce: Path) -> None:
        self.ledger = ledger
        self.announce = announce
        ledger_ref = ledger

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.path != "/sql" or not 0 < length <= _MAX_QUERY_BYTES:
                    self._reply(400, {"error": "POST /sql with {query, parameters} as the body"})
                    return
                try:
                    body = json.loads(self.rfile.read(length))
                    sql, parameters = str(body["query"]), dict(body.get("parameters") or {})
                except (ValueError, KeyError, TypeError):
                    self._reply(400, {"error": "POST /sql with {query, parameters} as the body"})
                    return
                try:
                    with ledger_ref.lock:
                        columns, rows = readonly_query(ledger_ref.client, sql, parameters or None)
                except LedgerError as exc:
                    self._reply(400, {"error": str(exc)})
                    return
                self._reply(200, {"columns": columns, "rows": rows})

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("sql endpoint: " + format, *args)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="ledger-sql", daemon=True)

    def start(self) -> None:
        self.thread.start()
        port = self.server.server_address[1]
        tmp = self.announce.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "port": port}))
        tmp.replace(self.announce)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            if json.loads(self.announce.read_text()).get("pid") == os.getpid():
                self.announce.unlink()
        except (OSError, ValueError):
            pass


def serve_queries(ledger: Ledger, dsn: str) -> QueryServer | None:
    announce = endpoint_file(dsn)
    if announce is None:
        return None  # a server: `callmeter sql` connects to it directly
    server = QueryServer(ledger, announce)
    server.start()
    return server


def render(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> str:
    """``table`` (aligned, for a terminal), ``csv`` (with a header) or ``json`` (one object per row)."""
    if fmt == "json":
        return json.dumps([dict(zip(columns, row, strict=True)) for row in rows], indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if v is None else _cell(v) for v in row] for row in rows])
        return out.getvalue()
    if not columns:
        return f"({len(rows)} rows)\n"
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(_numeric(r[i]) for r in rows) and bool(rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    text = [line(list(columns)), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    text.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(text) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, str):
        try:
            Decimal(value)
        except ArithmeticError:
            return False
        return value.strip() != "" and not value.lower().startswith(("nan", "inf", "-inf"))
    return False
