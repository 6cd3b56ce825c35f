"""The reference rows of `make bench` (issue 10): what Faust and the Kafka client cost on their own.

Each reference is a child process, ``python -m bench.refs KIND ...``, that consumes an input
topic already holding ``--records`` CallRecord values (real Avro from schemas/serde.py, calls from
pipeline/simulate.py), writes one output record per input record, and prints one JSON line: the records
it saw and the seconds from receiving the first to having handled the last. Its own app id / group,
output topic and a fresh state dir, so nothing is shared with another row but the input and the broker.

Kinds:

* ``faust``: a bare Faust ``exactly_once`` agent, ``stream.events()`` -> ``topic.send`` of the raw
  bytes, so the row measures Faust's per-message cost and nothing of ours;
* ``faust-take``: the same over ``stream.take_events(1000, within)``;
* ``stateful``: ``faust`` plus one RocksDB (rocksdict) table write per event, keyed per record as a
  dedupe store would be: the straightforward stateful agent, the baseline of every ratio;
* ``kafka``: confluent-kafka alone, a transactional consume -> produce loop, a transaction per batch
  of up to 1,000 (``send_offsets_to_transaction`` + ``commit_transaction``), plain bytes: the ceiling;
* ``kafka-avro``: the same with an Avro decode and encode per record.

A Faust run ends when the last record has been handed to the producer (its transaction commits on
the next commit interval, after the clock stops); a Kafka run ends when the last batch's transaction
has committed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError

FAUST_KINDS = ("faust", "faust-take", "stateful")
KAFKA_KINDS = ("kafka", "kafka-avro")
KINDS = FAUST_KINDS + KAFKA_KINDS
BATCH_RECORDS = 1000
TAKE_WITHIN_SECONDS = 0.2
"""How long ``take_events`` waits for a short batch: only the run's last batch ever waits for it."""
COMMIT_INTERVAL_SECONDS = 1.0
"""As callmeter's worker (pipeline/stream/worker.py), so the stateful row and the worker rows compare."""
IDLE_LIMIT_SECONDS = 120.0


class BenchError(PipelineError):
    """A reference run failed; the message is one line."""


# -- the parent's side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    peak_rss_mib: int
    """ru_maxrss of the child from wait4: the largest of it and the processes it waited for."""
    cpu_seconds: float
    """User + system CPU of the child and the processes it waited for (start-up included)."""


def run_child(argv: Sequence[str], env: dict[str, str], timeout_s: float) -> ChildRun:
    """Run ``argv`` to its end (killed after ``timeout_s``) and read its peak RSS from the kernel.

    ``os.wait4`` gives this child's own rusage; RUSAGE_CHILDREN would be the maximum over every child
    this bench ever ran, hiding a smaller row behind a larger one before it.
    """
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(list(argv), env=env, stdout=out, stderr=err)  # noqa: S603 - our own argv
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        return ChildRun(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            wall,
            round(usage.ru_maxrss / 1024),
            usage.ru_utime + usage.ru_stime,
        )


def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        admin.list_topics(timeout=15)
    except KafkaException as exc:
        msg = f"broker {bootstrap} unreachable: {exc}"
        raise BenchError(msg) from exc
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
    )
    for future in futures.values():
        future.result(60)


def produce_calls(bootstrap: str, topic: str, records: int, partitions: int, tenants: int) -> float:
    """Put ``records`` simulated CallRecords on a new ``topic`` (keyed by tenant, as gateways key them);
    returns the mean value size in bytes."""
    from confluent_kafka import Producer

    from pipeline.commands.simulate import SimulationConfig, generate
    from schemas.json_events import parse_json_event
    from schemas.serde import Serde

    create_topics(bootstrap, [topic], partitions)
    serde = Serde()
    producer = Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 20, "acks": "all"}
    )
    cfg = SimulationConfig(
        tenants=tenants, calls=records, duplicate_rate=0.0, late_rate=0.0, invalid_rate=0.0, seed=42
    )
    failures: list[str] = []

    def delivered(error: Any, _msg: Any) -> None:
        if error is not None:
            failures.append(str(error))

    produced = total_bytes = 0
    for event in generate(cfg):
        if event["type"] != "call":
            continue
        name, record = parse_json_event(event)
        value = serde.encode(name, record, topic)
        while True:
            try:
                producer.produce(topic, key=record["tenant_id"].encode(), value=value, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.5)
        producer.poll(0)
        produced += 1
        total_bytes += len(value)
    if producer.flush(60) or failures:
        msg = f"producing the reference input failed: {failures[:1] or 'flush timed out'}"
        raise BenchError(msg)
    return total_bytes / max(produced, 1)


def run_reference(
    kind: str, bootstrap: str, input_topic: str, prefix: str, records: int, partitions: int, state_dir: str
) -> tuple[dict[str, Any], ChildRun]:
    """Run one reference child; returns its JSON result and the run (for peak RSS)."""
    create_topics(bootstrap, [f"{prefix}out"], partitions)
    argv = [
        sys.executable,
        "-m",
        "bench.refs",
        kind,
        "--bootstrap",
        bootstrap,
        "--input",
        input_topic,
        "--prefix",
        prefix,
        "--records",
        str(records),
        "--partitions",
        str(partitions),
        "--state-dir",
        state_dir,
    ]
    run = run_child(argv, dict(os.environ), timeout_s=IDLE_LIMIT_SECONDS + records / 200)
    # Faust's console writes terminal escapes to stdout too, possibly ahead of the JSON on its line.
    lines = [line[line.find('{"records"') :] for line in run.stdout.splitlines() if '{"records"' in line]
    if not lines:
        tail = " ".join(run.stderr.strip().splitlines()[-1:])[:300]
        msg = f"reference {kind} exited {run.returncode} without a result: {tail}"
        raise BenchError(msg)
    return json.loads(lines[-1]), run


# -- the children ----------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Clock:
    """First record received to last record handled, for ``expected`` records: wall time, and this
    process's CPU time (all its threads) over the same span, which other load on a shared machine
    stretches far less than the wall time."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first = self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0

    def start(self) -> None:
        if self.count == 0 and not self.first:
            self.first = time.perf_counter()
            self.cpu_first = _cpu_seconds()

    def handled(self, n: int = 1) -> bool:
        self.count += n
        if self.count >= self.expected:
            self.last = time.perf_counter()
            self.cpu_last = _cpu_seconds()
            return True
        return False

    def result(self, **extra: Any) -> str:
        import resource

        seconds = self.last - self.first
        return json.dumps(
            {
                "records": self.count,
                "seconds": round(seconds, 3),
                "cpu_seconds": round(self.cpu_last - self.cpu_first, 3),
                "per_second": round(self.count / seconds) if seconds > 0 else None,
                "peak_rss_mib_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                **extra,
            }
        )


def _faust_child(kind: str, args: argparse.Namespace) -> int:
    import faust

    from pipeline.settings import Settings

    settings = Settings()  # the worker's producer linger and log level, for a like-for-like row
    app = faust.App(
        f"{args.prefix}app",
        broker=f"kafka://{args.bootstrap}",
        store="rocksdb://",
        processing_guarantee="exactly_once",
        datadir=args.state_dir,
        topic_partitions=args.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        # Faust 0.15.3 picks aiokafka's round-robin assignor for an app without tables and no standby
        # replicas, and then exactly_once crashes at the first assignment (KeyError in
        # group_for_topic: its transactional ids need Faust's own assignor). One standby replica
        # selects Faust's assignor; with a single worker no standby is ever assigned.
        table_standby_replicas=0 if kind == "stateful" else 1,
        web_enabled=False,
        broker_commit_interval=COMMIT_INTERVAL_SECONDS,
        stream_wait_empty=False,
        producer_linger_ms=settings.producer_linger_ms,
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw", "partitions": args.partitions}
    source = app.topic(args.input, internal=False, **raw)
    output = app.topic(f"{args.prefix}out", internal=False, **raw)
    table = (
        app.Table("seen", partitions=args.partitions, key_type=str, options={"driver": "rocksdict"})
        if kind == "stateful"
        else None
    )
    clock = _Clock(args.records)

    def finish() -> None:
        print(clock.result(kind=kind), flush=True)
        # Faust's worker stops cleanly on SIGTERM; the clock has already stopped.
        os.kill(os.getpid(), signal.SIGTERM)

    async def one_by_one(stream: Any) -> None:
        async for event in stream.events():
            clock.start()
            message = event.message
            if table is not None:
                table[f"{message.key.decode()}|{message.partition}|{message.offset}"] = len(message.value)
            await output.send(key=message.key, value=message.value)
            if clock.handled():
                finish()

    async def in_batches(stream: Any) -> None:
        async for events in stream.take_events(BATCH_RECORDS, within=TAKE_WITHIN_SECONDS):
            clock.start()
            for event in events:
                await output.send(key=event.message.key, value=event.message.value)
            if clock.handled(len(events)):
                finish()

    app.agent(source, name="ref")(in_batches if kind == "faust-take" else one_by_one)
    worker = faust.Worker(
        app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False, stdout=sys.stderr
    )
    worker.execute_from_commandline()  # exits the process
    return 0


def _kafka_child(kind: str, args: argparse.Namespace) -> int:
    from confluent_kafka import Consumer, Producer

    from schemas.serde import Serde

    serde = Serde() if kind == "kafka-avro" else None
    out_topic = f"{args.prefix}out"
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"{args.prefix}group",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer(
        {"bootstrap.servers": args.bootstrap, "transactional.id": f"{args.prefix}tx", "linger.ms": 5}
    )
    producer.init_transactions(60)
    consumer.subscribe([args.input])
    clock = _Clock(args.records)
    batches = 0
    idle_since = time.monotonic()
    while clock.count < args.records:
        messages = [m for m in consumer.consume(BATCH_RECORDS, timeout=1.0) if m.error() is None]
        if not messages:
            if time.monotonic() - idle_since > IDLE_LIMIT_SECONDS:
                print(f"no input for {IDLE_LIMIT_SECONDS:.0f} s after {clock.count} records", file=sys.stderr)
                return 1
            continue
        idle_since = time.monotonic()
        clock.start()
        producer.begin_transaction()
        for message in messages:
            value = message.value() or b""
            if serde is not None:
                name, record = serde.decode(value)
                value = serde.encode(name, record, out_topic)
            producer.produce(out_topic, key=message.key(), value=value)
        producer.send_offsets_to_transaction(
            consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
        )
        producer.commit_transaction()
        batches += 1
        clock.handled(len(messages))
    print(clock.result(kind=kind, transactions=batches), flush=True)
    consumer.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refs")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True, help="topic already holding the records")
    parser.add_argument("--prefix", required=True, help="this run's app id / group / output topic prefix")
    parser.add_argument("--records", type=int, required=True, help="stop after this many records")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args(argv)
    if args.kind in FAUST_KINDS:
        return _faust_child(args.kind, args)
    return _kafka_child(args.kind, args)


if __name__ == "__main__":
    sys.exit(main())
