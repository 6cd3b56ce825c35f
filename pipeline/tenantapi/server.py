"""The tenant API's HTTP server: ``/authorize``, ``/quota`` and ``/balances`` from the changelog view.

Started by `callmeter worker` (the supervising process, which does no stream work) when ``api_port``
is set, so a gateway's pre-call question is not queued behind the stream worker's event loop: under
`make bench` load that loop kept a request waiting ~25 ms at p99 (issue 12 asks < 5 ms). Every
`callmeter worker` service answers for every tenant (its view holds all partitions), so nothing is
forwarded. The bodies are the workers' own (pipeline/tenantapi/answers.py); an answer is as of the
workers' last commit (pipeline/tenantapi/view.py). Until the view has read the committed state, and
whenever the catalog cannot decide, the answer is 503: the gateway's unreachable policy applies.

A thread per request (stdlib ``ThreadingHTTPServer``), HTTP/1.1 keep-alive for gateways that reuse a
connection. Plus ``/status`` (the view's progress) and ``/metrics`` (this process's registry).
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import metrics
from pipeline.tenantapi.answers import ANSWERS, LedgerLookup, respond
from pipeline.tenantapi.view import ChangelogView
from rating.catalog import Catalog

log = logging.getLogger(__name__)


class TenantApi:
    """The view's consumer thread and the HTTP server's thread. Constructing it binds the port (OSError
    when it is taken); ``start()`` starts both threads, ``stop()`` ends them."""

    def __init__(
        self, view: ChangelogView, catalog: Catalog, bind: str, port: int, ledger: LedgerLookup | None = None
    ) -> None:
        self.view = view
        self.catalog = catalog
        self.ledger = ledger
        api = self

        class Handler(_Handler):
            tenant_api = api

        self.server = ThreadingHTTPServer((bind, port), Handler)
        self.server.daemon_threads = True
        self._threads = [
            threading.Thread(target=view.run, name="tenant-api-view", daemon=True),
            threading.Thread(target=self.server.serve_forever, name="tenant-api-http", daemon=True),
        ]

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.view.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def answer(
        self, endpoint: str, tenant_id: str, query: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any]]:
        at = query["at"][0] if query.get("at") else None
        return respond(endpoint, tenant_id, at, self.view, self.catalog, self.ledger)


class _Handler(BaseHTTPRequestHandler):
    tenant_api: TenantApi
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if len(parts) == 2 and parts[0] in ANSWERS and parts[1]:
            status, body = self.tenant_api.answer(parts[0], parts[1], urllib.parse.parse_qs(url.query))
            self._send(status, json.dumps(body).encode(), "application/json")
        elif parts == ["status"]:
            self._send(200, json.dumps(self.tenant_api.view.status()).encode(), "application/json")
        elif parts == ["metrics"]:
            self._send(200, generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST)
        else:
            self._send(404, json.dumps({"error": "no such endpoint"}).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per request would drown the worker's stderr; /metrics counts them.
        return
