"""The ledger sink as a process of its own, beside several stream worker processes.

`callmeter worker` starts it when ``worker_processes`` > 1 (pipeline/commands/supervisor.py), and
`callmeter sink` runs it alone beside worker services started with ``worker_ledger_sink`` false. It
is the only process that opens the ledger: chdb allows one process per path, and a sink thread inside
a worker would fight that worker's event loop for the GIL. Its commit protocol is the sink's
(sinks/sink.py); running apart from the stream workers changes none of its steps.

With ``--until-idle`` it stops once every input is committed by the stream workers' group, every
output is written, and nothing moved for ``idle_seconds``: the stream workers exit when the inputs are
done, and the sink drains what they committed last.

It serves its metrics (ledger rows, insert durations and failures) at ``/metrics`` on
``worker_web_port``, as a worker does: the ledger alerts need them from the process that writes; and
at ``/status`` its pipeline and how its sink is doing, for `callmeter status` (sink_web.py).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections import Counter
from types import FrameType
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline import runcounts
from pipeline.errors import RetryableError
from pipeline.identity import remember_cluster_id
from pipeline.idle import IdleWatch
from pipeline.settings import Settings
from rating.catalog import Catalog
from schemas.serde import Serde
from sinks.opening import open_ledger
from sinks.sink import LedgerSink
from sinks.web import SinkWeb

log = logging.getLogger(__name__)


def run_sink(
    settings: Settings, bootstrap: str, catalog: Catalog, serde: Serde, until_idle: bool, catalog_text: str
) -> dict[str, Any]:
    """Run the sink until SIGTERM/SIGINT (or idle); return its counters. Raises RetryableError when
    the ledger refused a batch (its offsets stay uncommitted; a new process takes it again)."""
    web = SinkWeb(settings)
    web.start()
    try:
        remember_cluster_id(_cluster_id(bootstrap))
        return _run(settings, bootstrap, catalog, serde, until_idle, catalog_text)
    finally:
        web.stop()


def _cluster_id(bootstrap: str) -> str | None:
    """The Kafka cluster's id, which this process states in its /status (pipeline/identity.py)."""
    try:
        return str(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).cluster_id)
    except KafkaException:
        return None  # not reached yet: the sink's consumer reports the outage


def _run(
    settings: Settings, bootstrap: str, catalog: Catalog, serde: Serde, until_idle: bool, catalog_text: str
) -> dict[str, Any]:
    ledger = open_ledger(settings, catalog, catalog_text)
    sink = LedgerSink(settings, bootstrap, serde, ledger)
    counts_file = runcounts.stats_file()
    if counts_file is not None:
        runcounts.ensure_dir(counts_file)
        sink.on_committed = lambda: runcounts.write_committed(counts_file, _counters(sink))
    done = threading.Event()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    watch = (
        IdleWatch(
            settings,
            bootstrap,
            done.set,
            progress=lambda: (sink.rows_written, sink.batches),
            ready=lambda: True,
            sink=sink,
        )
        if until_idle
        else None
    )
    sink.start()
    if watch is not None:
        watch.start()
    try:
        while not done.wait(0.5):
            if sink.error is not None:
                break
    finally:
        if watch is not None:
            watch.halt()
        sink.stop()
        ledger.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if sink.error is not None:
        msg = f"ledger sink failed: {sink.error}"
        raise RetryableError(msg) from sink.error
    return _counters(sink)


def _counters(sink: LedgerSink) -> dict[str, Any]:
    return {"duplicates_in_ledger": dict(Counter(sink.duplicates)), "ledger_rows_written": sink.rows_written}


def print_result(result: dict[str, Any]) -> None:
    print(json.dumps(result, sort_keys=True), flush=True)
