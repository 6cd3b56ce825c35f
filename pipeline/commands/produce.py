"""`callmeter produce`: publish JSON-lines events to their topics, keyed by tenant, in file order."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer

from pipeline.errors import InputError, PipelineError
from pipeline.progress import Progress, disabled
from pipeline.settings import Settings
from schemas.errors import SerdeError
from schemas.json_events import parse_json_event
from schemas.serde import Serde


class _TransientKafkaWarnings(logging.Filter):
    """librdkafka warns while a brand-new cluster's coordinator loads ("Coordinator load in progress:
    retrying") and retries by itself; a user producing to a fresh broker has nothing to do about it.
    Anything else the client logs still reaches stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().lower()
        return not (
            "retrying" in text and ("load in progress" in text or "coordinator not available" in text)
        )


KAFKA_LOG = logging.getLogger("callmeter.kafka")
KAFKA_LOG.addFilter(_TransientKafkaWarnings())


def producer_config(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "logger": KAFKA_LOG,
        # Idempotence keeps per-partition order through retries, so "file order per tenant" holds.
        "enable.idempotence": True,
        # The Java client's partitioner: every producer of calls and provisioning must hash tenants
        # the same way or a tenant's two streams land on different partition numbers.
        "partitioner": "murmur2_random",
        "linger.ms": 20,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500000,
    }


STDIN = "-"


def check_input(path: Path) -> None:
    """Refuse, before anything is read or sent, a path that cannot be a JSON-lines file: saying which
    of "missing", "a directory" or "unreadable" it is."""
    if str(path) == STDIN:
        return
    if path.is_dir():
        msg = f"{path} is a directory; produce takes JSON-lines files (or - for standard input)"
        raise InputError(msg)
    if not path.exists():
        msg = f"no such file: {path}"
        raise InputError(msg)


def read_events(
    path: Path, shown: str | None = None, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield (line number, record name, record) for every non-blank line; InputError names the line.
    ``shown``: the name messages give the file (``<stdin>`` for a spooled standard input);
    ``on_bytes`` is told the size of every line read (progress)."""
    name = shown or str(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        msg = f"cannot read {name}: {exc.strerror or exc}"
        raise InputError(msg) from exc
    with handle:
        for lineno, raw in enumerate(handle, 1):
            if on_bytes is not None:
                on_bytes(len(raw))
            try:
                # A byte-order mark may start the file (editors on Windows write one).
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                msg = (
                    f"{name}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); JSON lines must be UTF-8"
                )
                raise InputError(msg) from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                msg = f"{name}:{lineno}: not valid JSON ({exc.msg})"
                raise InputError(msg) from exc
            if not isinstance(obj, dict):
                msg = f"{name}:{lineno}: expected a JSON object"
                raise InputError(msg)
            try:
                record_name, record = parse_json_event(obj)
            except SerdeError as exc:
                msg = f"{name}:{lineno}: {exc.message}"
                raise InputError(msg) from exc
            yield lineno, record_name, record


class EventPublisher:
    """Encodes and publishes events; raises PipelineError when any delivery failed."""

    def __init__(self, settings: Settings, bootstrap: str, serde: Serde) -> None:
        self.topics = settings.topics
        self.serde = serde
        self.producer = Producer(producer_config(bootstrap))
        self.sent: Counter[str] = Counter()
        self.failures: list[str] = []

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failures.append(str(err))

    def publish(self, name: str, record: dict[str, Any]) -> None:
        topic = self.topics.calls if name == "CallRecord" else self.topics.provisioning
        self.publish_raw(topic, record["tenant_id"].encode(), self.serde.encode(name, record, topic))
        self.sent[topic] += 1

    def publish_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=self._on_delivery)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)

    def close(self) -> None:
        try:
            remaining = self.producer.flush(60)
        except KafkaException as exc:
            msg = f"produce failed: {exc}"
            raise PipelineError(msg) from exc
        if remaining:
            msg = f"{remaining} events not delivered within 60 s"
            raise PipelineError(msg)
        if self.failures:
            msg = f"{len(self.failures)} events not delivered: {self.failures[0]}"
            raise PipelineError(msg)


def produce_files(
    settings: Settings, bootstrap: str, serde: Serde, paths: list[Path], progress: Progress | None = None
) -> Counter[str]:
    """Publish every event of ``paths`` in order, or nothing: every file is validated completely first,
    so a bad line aborts before anything is published and a corrected file can simply be produced
    again. ``-`` (standard input) and other one-pass inputs (a pipe, ``<(...)``) are read to their end
    into a temporary file first, for the same reason: produce is for files, not endless streams."""
    progress = progress or disabled()
    with tempfile.TemporaryDirectory(prefix="callmeter-produce-") as spool_dir, progress:
        inputs = [_rereadable(path, Path(spool_dir) / f"{i}.jsonl") for i, path in enumerate(paths)]
        progress.phase("checking", sum(path.stat().st_size for path, _shown in inputs), "bytes")
        checked = 0

        def read(n: int) -> None:
            nonlocal checked
            checked += n
            progress.update(checked)

        events = sum(1 for path, shown in inputs for _ in read_events(path, shown, read))
        progress.phase("producing", events, "events")
        publisher = EventPublisher(settings, bootstrap, serde)
        sent = 0
        for path, shown in inputs:
            for _lineno, name, record in read_events(path, shown):
                publisher.publish(name, record)
                sent += 1
                progress.update(sent)
        progress.phase("waiting for the broker's acknowledgements", unit="")
        publisher.close()
    return publisher.sent


def _rereadable(path: Path, spool: Path) -> tuple[Path, str]:
    """(a path that can be read twice, the name messages use for it)."""
    if str(path) == STDIN:
        with spool.open("wb") as out:
            shutil.copyfileobj(sys.stdin.buffer, out)
        return spool, "<stdin>"
    if not path.is_file():  # a pipe or a device: one pass only
        try:
            with path.open("rb") as source, spool.open("wb") as out:
                shutil.copyfileobj(source, out)
        except OSError as exc:
            msg = f"cannot read {path}: {exc.strerror or exc}"
            raise InputError(msg) from exc
        return spool, str(path)
    return path, str(path)
