"""The worker's own HTTP pages on Faust's web server: ``/metrics`` and ``/status``. The tenant endpoints
on the same port are the tenant API's (pipeline/tenantapi/worker_port.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import metrics

if TYPE_CHECKING:
    from pipeline.stream.app import StreamApp


def install(stream: StreamApp) -> None:
    app = stream.app

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/status")
    async def status_page(web: Any, request: Any) -> Any:
        return web.json(stream.status())
