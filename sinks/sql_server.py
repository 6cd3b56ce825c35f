"""The read-only query endpoint of the process holding the embedded ledger: the sink's
(pipeline/ledgerquery/sql.py asks it).

chdb opens a path in one process only; while the sink holds the ledger, `callmeter sql`, usage and
status are answered here. Each request gets a connection handle and session of its own on the same
engine (``local_query``), never the sink's client: a query neither waits for the sink's inserts nor
changes the session they run in, and the sink does not wait for it.

The answer streams as JSON lines: ``{"columns": [...]}``, one JSON array per row as the engine produces
it, then ``{"end": n}``, or ``{"error": ..., "limit": ...}`` when the query fails part way. An error
before the first row is a 400 with the same body. A client that stops reading (it has the rows it
wanted) closes the connection; the next write here fails and the query is cancelled.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sinks.errors import LedgerError
from sinks.readonly import (
    QueryLimitError,
    QueryLimits,
    decode_parameters,
    endpoint_file,
    limits_from_json,
    local_query,
)

log = logging.getLogger(__name__)
_MAX_QUERY_BYTES = 1_000_000
_USAGE = "POST /sql with {query, parameters, limits} as the body"


def _error_body(exc: LedgerError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, QueryLimitError):
        body["limit"] = exc.limit
    return body


class QueryServer:
    """Serves read-only queries on the embedded ledger at ``dsn``, which this process holds."""

    def __init__(self, dsn: str, announce: Path) -> None:
        self.announce = announce

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = self._request()
                if request is None:
                    self._reply(400, {"error": _USAGE})
                    return
                sql, parameters, limits = request
                try:
                    with local_query(dsn, None, sql, limits, parameters or None) as stream:
                        self._stream(stream.columns, stream.source, limits)
                except LedgerError as exc:
                    if not self._started:
                        self._reply(400, _error_body(exc))
                    else:
                        self._line(_error_body(exc))
                except (BrokenPipeError, ConnectionResetError):
                    log.debug("sql endpoint: the client left before the end of the result")

            def _request(self) -> tuple[str, dict[str, Any], QueryLimits] | None:
                self._started = False
                length = int(self.headers.get("Content-Length") or 0)
                if self.path != "/sql" or not 0 < length <= _MAX_QUERY_BYTES:
                    return None
                try:
                    body = json.loads(self.rfile.read(length))
                    return (
                        str(body["query"]),
                        decode_parameters(dict(body.get("parameters") or {})),
                        limits_from_json(dict(body["limits"])),
                    )
                except (ValueError, KeyError, TypeError, ArithmeticError):
                    return None

            def _stream(self, columns: list[str], rows: Any, limits: QueryLimits) -> None:
                # One row past the limit tells the client there were more; the engine stops soon after.
                if limits.max_rows:
                    rows = itertools.islice(rows, limits.max_rows + 1)
                first = next(rows, None)  # an error at the first block is still a 400
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                self._started = True
                self._line({"columns": columns})
                n = 0
                for row in itertools.chain([first] if first is not None else [], rows):
                    self.wfile.write(json.dumps(row).encode() + b"\n")
                    n += 1
                self._line({"end": n})

            def _line(self, body: dict[str, Any]) -> None:
                self.wfile.write(json.dumps(body).encode() + b"\n")
                self.wfile.flush()

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
        self.server.daemon_threads = True
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


def serve_queries(dsn: str) -> QueryServer | None:
    announce = endpoint_file(dsn)
    if announce is None:
        return None  # a server: `callmeter sql` connects to it directly
    server = QueryServer(dsn, announce)
    server.start()
    return server
