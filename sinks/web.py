"""The sink process's HTTP port (``worker_web_port`` of its process): ``/metrics`` for Prometheus, as a
worker serves it, and ``/status`` for `callmeter status`: which pipeline this is (pipeline/identity.py)
and how its sink is doing (sinks/health.py). A stream worker serves the same two pages from
its Faust web server (pipeline/stream/web.py)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import metrics
from pipeline.errors import PipelineError
from pipeline.identity import describe
from pipeline.settings import Settings
from sinks.health import running_sink_status

log = logging.getLogger(__name__)


def sink_status(settings: Settings) -> dict[str, Any]:
    return {"pipeline": describe(settings, "sink"), "ready": True, "sink": running_sink_status()}


class SinkWeb:
    def __init__(self, settings: Settings) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/status":
                    body = json.dumps(sink_status(settings)).encode()
                    kind = "application/json"
                else:  # /metrics, and any other path, as prometheus_client's own server answers
                    body, kind = generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("sink web: " + format, *args)

        try:
            self.server = ThreadingHTTPServer((settings.worker_web_bind, settings.worker_web_port), Handler)
        except OSError as exc:
            where = f"{settings.worker_web_bind}:{settings.worker_web_port}"
            msg = f"sink metrics: cannot listen on {where}: {exc}"
            raise PipelineError(msg) from exc
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="sink-web", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
