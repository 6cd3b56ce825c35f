"""Running the stream worker in this process: local state, the Faust worker, the sink and watchers.

(`callmeter worker` runs this in a supervised child process: pipeline/commands/supervisor.py.)
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import faust

from pipeline import logfilters, runcounts
from pipeline.errors import RetryableError
from pipeline.idle import IdleWatch
from pipeline.settings import Settings
from pipeline.stream.app import StreamApp
from pipeline.stream.stats import Stats
from pipeline.stream.watch import LagMonitor
from rating.catalog import Catalog
from schemas.serde import Serde
from sinks.opening import open_ledger

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


class _Worker(faust.Worker):
    """Faust's worker, telling the meter when start-up (recovery included) has finished."""

    meter: StreamApp

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

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        # A stop on purpose (SIGTERM, SIGINT, idle): the Kafka client's complaints about a group that
        # rebalances while it closes are expected from now on (pipeline/logfilters.py).
        logfilters.stopping()
        super()._schedule_shutdown(signum)


def run_worker(
    settings: Settings,
    bootstrap: str,
    catalog: Catalog,
    serde: Serde,
    until_idle: bool,
    catalog_text: str = "",
    with_sink: bool = True,
    install_routes: Callable[[StreamApp], None] | None = None,
) -> Stats:
    """Run the worker in this process until SIGTERM/SIGINT, or until idle. Raises on a sink failure.

    ``install_routes`` adds HTTP routes to the worker's port (the caller's: the tenant endpoints live
    above this package). ``with_sink``: this process also runs the ledger sink (one worker process).
    With several worker processes the sink is a process of its own (sinks/process.py):
    chdb opens a path in one process only, and the sink's inserts then never compete with an event
    loop for the GIL."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ledger = open_ledger(settings, catalog, catalog_text) if with_sink else None
    prepare_state_dir(settings.worker_state_dir)
    meter = StreamApp(settings, bootstrap, catalog, serde)
    from pipeline.stream import web

    web.install(meter)
    if install_routes is not None:
        install_routes(meter)  # the tenant endpoints (pipeline/tenantapi/worker_port.py)
    meter.guard.flowing = meter.app.flow_control.is_active
    counts_file = runcounts.stats_file()
    if counts_file is not None:
        runcounts.ensure_dir(counts_file)
        meter.guard.on_commit = lambda: runcounts.write_committed(counts_file, meter.stats.to_dict())
    from pipeline.topics import ensure_internal_topics

    try:
        ensure_internal_topics(bootstrap, meter.internal_topics())
    except Exception:
        if ledger is not None:
            ledger.close()
        raise
    from sinks.sink import LedgerSink

    sink = LedgerSink(settings, bootstrap, serde, ledger) if ledger is not None else None
    # stdout is the command's result (JSON stats); Faust's console output goes to stderr.
    worker = _Worker(
        meter.app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False, stdout=sys.stderr
    )
    worker.meter = meter
    # Faust's start-up spinner writes cursor escape codes even when stderr is a log file, and several
    # worker processes share one terminal: progress is the supervisor's (`--until-idle` on a terminal).
    worker.spinner = None
    loop = worker.loop

    def stop_soon() -> None:
        loop.call_soon_threadsafe(worker._schedule_shutdown, signal.SIGTERM)

    def progress() -> tuple[int, int]:
        return meter.stats.total(), sink.rows_written if sink is not None else 0

    watch = (
        IdleWatch(settings, bootstrap, stop_soon, progress=progress, ready=meter.ready.is_set, sink=sink)
        if until_idle
        else None
    )
    if sink is not None:
        # A sink stopped on an error stops this process (exit EXIT_RETRY below), which its supervisor
        # restarts: a long-running worker must not go on rating with nothing writing the ledger.
        sink.on_failed = stop_soon
    lag = LagMonitor(meter, bootstrap)
    lag.start()
    if sink is not None:
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
        if sink is not None:
            sink.stop()
            meter.stats.duplicates_in_ledger.update(sink.duplicates)
        if ledger is not None:
            ledger.close()
    if sink is not None and sink.error is not None:
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
        mark_clean(settings.worker_state_dir)
    (settings.worker_state_dir.with_name(f"{settings.worker_state_dir.name}-stats.json")).write_text(
        json.dumps(meter.stats.to_dict(), indent=2)
    )
    return meter.stats
