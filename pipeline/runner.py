"""Running the stream worker in this process: local state, the Faust worker, the sink and watchers.

(`callmeter worker` runs this in a supervised child process: pipeline/supervisor.py.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import faust.tables.recovery as faust_recovery

from pipeline.errors import RetryableError
from pipeline.settings import Settings
from pipeline.stats import Stats
from pipeline.watch import IdleWatch, LagMonitor
from pipeline.worker import Meter
from rating.catalog import Catalog
from schemas.serde import Serde
from sinks.ledger import Ledger

log = logging.getLogger(__name__)

_CLEAN_MARKER = ".clean-shutdown"


def prepare_state_dir(state_dir: Path) -> bool:
    """Keep local table state only after a clean shutdown; return True when it was wiped."""
    marker = state_dir / _CLEAN_MARKER
    if marker.exists():
        marker.unlink()
        return False
    if state_dir.exists() and any(state_dir.iterdir()):
        log.warning("previous worker stop was not clean: rebuilding local state from changelogs")
        shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True)
        return True
    state_dir.mkdir(parents=True, exist_ok=True)
    return False


def mark_clean(state_dir: Path) -> None:
    (state_dir / _CLEAN_MARKER).write_text(datetime.now(UTC).isoformat())


class _QuickRecoveryPoll:
    """Faust's changelog recovery waits on its queue with a hard-coded 5 s timeout and, under
    exactly_once, needs two empty waits before it notices that the only thing left before the high
    watermark is a transaction marker — a ~10-15 s stall on every start. Ending recovery still requires
    the consumer position to have reached the high watermark (``detect_aborted_tx``), so a shorter
    wait cannot end recovery early; it only stops waiting on an idle queue for so long."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def wait_for(aw: Any, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(aw, timeout=min(timeout, 0.5) if timeout else timeout)


faust_recovery.asyncio = _QuickRecoveryPoll()  # type: ignore[assignment]


class _Worker(faust.Worker):
    """Faust's worker, telling the meter when start-up (recovery included) has finished."""

    meter: Meter

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        # The Kafka client logs every send at DEBUG; whatever enabled it, it costs ~4 % of the event
        # loop at volume. Keep the client libraries at the configured level or quieter.
        level = max(logging.getLevelName(self.meter.settings.log_level.upper()), logging.INFO)
        for name in ("aiokafka", "faust", "mode", "kafka"):
            logging.getLogger(name).setLevel(level)
        # "producer buffer full" is Faust applying backpressure to changelog writes, which is normal
        # at volume, not a fault; operators watch lag and throughput instead.
        logging.getLogger("faust.transport.producer").setLevel(max(level, logging.ERROR))
        self.meter.ready.set()


def run_worker(
    settings: Settings,
    bootstrap: str,
    catalog: Catalog,
    serde: Serde,
    until_idle: bool,
    catalog_text: str = "",
) -> Stats:
    """Run the worker in this process until SIGTERM/SIGINT, or until idle. Raises on a sink failure."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(settings.clickhouse_dsn, _secret(settings))
    if catalog_text:
        from pipeline.catalogs import register_catalog

        try:
            register_catalog(ledger, catalog, catalog_text)
        except Exception:
            ledger.close()
            raise
    prepare_state_dir(settings.data_dir / "worker")
    meter = Meter(settings, bootstrap, catalog, serde)
    from pipeline.broker import ensure_internal_topics

    try:
        ensure_internal_topics(bootstrap, meter.internal_topics())
    except Exception:
        ledger.close()
        raise
    from pipeline.sink import LedgerSink

    sink = LedgerSink(settings, bootstrap, serde, ledger)
    # stdout is the command's result (JSON stats); Faust's console output goes to stderr.
    worker = _Worker(
        meter.app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False, stdout=sys.stderr
    )
    worker.meter = meter
    loop = worker.loop

    def stop_soon() -> None:
        loop.call_soon_threadsafe(worker._schedule_shutdown, signal.SIGTERM)

    watch = IdleWatch(meter, sink, bootstrap, stop_soon) if until_idle else None
    lag = LagMonitor(meter, bootstrap)
    lag.start()
    sink.start()
    if watch is not None:
        watch.start()
    exit_code: object = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        exit_code = exc.code
    finally:
        if watch is not None:
            watch.halt()
        lag.halt()
        sink.stop()
        ledger.close()
    if sink.error is not None:
        msg = f"ledger sink failed: {sink.error}"
        raise RetryableError(msg) from sink.error
    if exit_code not in (0, None):
        # Faust stopped on an error: the last transaction may be aborted, so the local state is not
        # marked clean and the next start rebuilds it from the changelogs.
        msg = f"stream worker stopped with an error (exit {exit_code}); see the log above"
        raise RetryableError(msg)
    if meter.faults:
        # A client error was logged during the run (broker connection lost, a failed commit): the
        # local state may hold writes of a transaction that never committed. Do not vouch for it.
        log.warning("not marking local state clean after %d client error(s)", meter.faults)
    else:
        mark_clean(settings.data_dir / "worker")
    (settings.data_dir / "worker-stats.json").write_text(json.dumps(meter.stats.to_dict(), indent=2))
    return meter.stats


def _secret(settings: Settings) -> str | None:
    return settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None
