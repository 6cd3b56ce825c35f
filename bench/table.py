"""`make bench`: one table, every row measured in this run on the same broker.

Run as ``python -m bench.table [--calls N] [--only refs,callmeter,replay,balance]``.
Rows, each with its rate and its ratio to the straightforward stateful Faust agent:

1. the reference agents of bench/refs.py (bare Faust, with ``take_events``, the
   stateful agent, the raw confluent-kafka transactional loop with and without Avro), over N simulated
   CallRecords;
2. ``callmeter worker --until-idle`` with each ``--processes`` count (bench/callmeter_rows.py
   ``throughput``: N simulated calls with 1 % retries, 1 % late and 0.1 % bad records, start-up included);
3. ``callmeter replay`` of the month the 1-process run consumed, from Kafka into new ledger rows under
   catalog revision 2 (the whole command: start-up, reading, rating, writing and the money summary);
4. balance latency under simulator load (bench/callmeter_rows.py ``balance_bench``), a second small table;
5. with ``--rss-at 1000000,3000000``, peak RSS of ``worker --until-idle`` at those sizes (slow: only
   when asked).

The tables go to stdout and to ``--out`` (default docs/bench-results.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.refs import KINDS, BenchError, produce_calls, run_child, run_reference
from bench.report import Row, latency_table, targets_table, throughput_table
from pipeline.settings import SAMPLE_CATALOG, Settings

GROUPS = ("refs", "callmeter", "replay", "balance")
DEFAULT_OUT = Path("docs/bench-results.md")
# Events/s of the latency rows' paced load when no worker row was measured in the run (--only balance).
FALLBACK_BALANCE_RATE = 500.0
REF_WHAT = {
    "faust": "bare Faust `exactly_once` agent, consume → one output per event",
    "faust-take": "same with `stream.take_events(1000)`",
    "stateful": "same + one RocksDB (rocksdict) table write per event: the straightforward stateful agent",
    "kafka": "raw confluent-kafka transactional consume → produce, batches of 1,000",
    "kafka-avro": "same with Avro decode + encode per record",
}
REF_HOW = {
    "faust": "own child process, input produced before; first record received → last handed to the producer",
    "kafka": "own child process, input produced before; first record received → last transaction committed",
}
# A replay over every period the simulated month touches (tenants' periods start on different days).
REPLAY_FROM = "2026-08-01T00:00:00Z"
REPLAY_TO = "2027-01-01T00:00:00Z"


def reference_rows(bootstrap: str, work: Path, calls: int, partitions: int, tenants: int) -> list[Row]:
    run_id = uuid.uuid4().hex[:6]
    input_topic = f"benchref{run_id}.calls"
    value_bytes = produce_calls(bootstrap, input_topic, calls, partitions, tenants)
    print(f"reference input: {calls:,} CallRecords, {value_bytes:.0f} bytes each on average", file=sys.stderr)
    rows = []
    for kind in KINDS:
        prefix = f"benchref{run_id}{kind.replace('-', '')}."
        result, run = run_reference(
            kind, bootstrap, input_topic, prefix, calls, partitions, str(work / f"ref-{kind}")
        )
        how = REF_HOW.get(kind, "")
        if kind == "faust":
            how += f"; {partitions} partitions, ~{value_bytes:.0f}-byte Avro values, raw bytes out"
        if kind == "kafka":
            how += f"; {result.get('transactions')} transactions"
        rows.append(
            Row(
                kind,
                REF_WHAT[kind],
                result["records"],
                result["seconds"],
                "msg/s",
                run.peak_rss_mib,
                how,
                result["cpu_seconds"],
            )
        )
        print(f"{kind}: {result}", file=sys.stderr)
    return rows


def worker_row(result: dict[str, Any]) -> Row:
    n = result["worker_processes"]
    what = f"callmeter `worker --until-idle`, {n} worker process{'es' if n > 1 else ''}"
    note = (
        f"events incl. provisioning, retries and bad records, start-up included; rated {result['rated']}, "
        "peak RSS of the largest process, CPU of all of them"
    )
    return Row(
        f"worker-{n}",
        what,
        result["events_consumed"],
        result["worker_until_idle_seconds"],
        "events/s",
        result["peak_rss_mib_largest_process"],
        note,
        result.get("cpu_seconds"),
    )


def steady_row(result: dict[str, Any]) -> Row:
    """The same run net of start-up and of the idle check: first to last input commit (bench/steady.py)."""
    n = result["worker_processes"]
    return Row(
        f"worker-{n}-steady",
        f"same, {n} process{'es' if n > 1 else ''}, net of start-up and idle check",
        result["steady_records"],
        result["steady_seconds"],
        "events/s",
        None,
        "records committed from the first input commit to the last, over the time between them",
    )


def replay_row(env: dict[str, str], worker: dict[str, Any], work: Path) -> Row:
    """``callmeter replay`` of the month the worker run consumed, under catalog revision 2."""
    catalog = work / "catalog-rev2.yaml"
    text = SAMPLE_CATALOG.read_text(encoding="utf-8")
    catalog.write_text(re.sub(r"(?m)^revision: *\d+", "revision: 2", text, count=1), encoding="utf-8")
    env = dict(
        env,
        CALLMETER_TOPIC_PREFIX=worker["topic_prefix"],
        CALLMETER_DATA_DIR=worker["data_dir"],
        CALLMETER_CATALOG=str(catalog),
    )
    argv = [sys.executable, "-m", "pipeline", "replay", "--from", REPLAY_FROM, "--to", REPLAY_TO]
    run = run_child([*argv, "--source", "kafka"], env, timeout_s=3600)
    found = re.search(r"from kafka: (\d+) calls", run.stderr)
    if run.returncode != 0 or found is None:
        tail = " ".join(run.stderr.strip().splitlines()[-1:])[:300]
        msg = f"replay exited {run.returncode}: {tail}"
        raise BenchError(msg)
    return Row(
        "replay",
        "callmeter `replay` from Kafka into new ledger rows (catalog revision 2), worker stopped",
        int(found[1]),
        round(run.wall_seconds, 1),
        "calls/s",
        run.peak_rss_mib,
        "whole command: start-up, read, rate, write, money summary",
        run.cpu_seconds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table")
    parser.add_argument("--calls", type=int, default=os.environ.get("BENCH_CALLS", "100000"))
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--processes", default="1,2", help="worker process counts, one row each")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma list of {', '.join(GROUPS)}")
    parser.add_argument("--requests", type=int, default=2000, help="balance latency requests")
    parser.add_argument(
        "--balance-rate",
        type=float,
        default=0.0,
        help="events/s of the paced load during the latency rows (default: 80 %% of the fastest callmeter "
        f"row measured in this run, else {FALLBACK_BALANCE_RATE:.0f})",
    )
    parser.add_argument("--rss-at", default="", help="comma list of call counts: peak RSS rows (slow)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown results file")
    args = parser.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or args.calls <= 0:
        what = f"unknown --only group(s) {', '.join(unknown)}" if unknown else "--calls must be positive"
        print(f"callmeter-bench: {what}", file=sys.stderr)
        return 2
    try:
        processes = [int(n) for n in args.processes.split(",") if n]
        rss_at = [int(n) for n in args.rss_at.split(",") if n]
    except ValueError:
        print("callmeter-bench: --processes and --rss-at take comma lists of integers", file=sys.stderr)
        return 2
    from subprocess import CalledProcessError

    from confluent_kafka import KafkaException

    from pipeline.errors import CallmeterError

    try:
        return _run(args, groups, processes, rss_at)
    except (CallmeterError, KafkaException, RuntimeError, OSError, CalledProcessError) as exc:
        # A run that failed (no broker, a child that crashed) is one line and a non-zero exit.
        detail = (exc.stderr or "").strip().splitlines()[-1:] if isinstance(exc, CalledProcessError) else []
        print(f"callmeter-bench: {' '.join([str(exc), *detail])[:500]}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, groups: list[str], processes: list[int], rss_at: list[int]) -> int:
    from bench.callmeter_rows import balance_bench, throughput

    work = Path(tempfile.mkdtemp(prefix="callmeter-bench-"))
    env = dict(os.environ, CALLMETER_PARTITIONS=str(args.partitions))
    if not env.get("CALLMETER_KAFKA"):
        from pipeline.local.broker import LocalKafka

        env["CALLMETER_KAFKA"] = LocalKafka(Settings(data_dir=Path(".callmeter"))).up()
    bootstrap = env["CALLMETER_KAFKA"]
    rows: list[Row] = []
    if "refs" in groups:
        rows += reference_rows(bootstrap, work, args.calls, args.partitions, args.tenants)
    if "callmeter" in groups or "replay" in groups:
        counts = processes if "callmeter" in groups else [1]
        replay: list[Row] = []
        for n in counts:
            result = throughput(env, args, work, n)
            if "callmeter" in groups:
                rows.append(worker_row(result))
                if result.get("steady_per_second"):
                    rows.append(steady_row(result))
            if "replay" in groups and n == counts[0]:
                # Now, while the month's ledger is the only thing in this data dir and no worker runs.
                replay.append(replay_row(env, result, work))
        rows += replay
    for calls in rss_at:
        result = throughput(env, argparse.Namespace(**{**vars(args), "calls": calls}), work, max(processes))
        row = worker_row(result)
        rows.append(Row(f"rss-{calls}", f"peak RSS at {calls:,} calls: " + row.what, *_rest(row)))
    latency: dict[str, object] | None = None
    if "balance" in groups:
        rate = args.balance_rate or _eighty_percent(rows)
        latency = _balance(env, args, balance_bench, rate)
    text = _report(args, rows, latency)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"written to {args.out}", file=sys.stderr)
    return 0


def _rest(row: Row) -> tuple[Any, ...]:
    return (row.count, row.seconds, row.unit, row.peak_rss_mib, row.note, row.cpu_seconds)


def _eighty_percent(rows: list[Row]) -> float:
    """Latency is timed "at 80 % of the sustained rate": of the fastest worker row of this run."""
    rates = [row.per_second for row in rows if row.key.startswith("worker-") and row.per_second]
    return 0.8 * max(rates) if rates else FALLBACK_BALANCE_RATE


def _balance(env: dict[str, str], args: argparse.Namespace, bench: Any, rate: float) -> dict[str, object]:
    from pipeline.topics import ensure_topics

    prefix = f"bench{uuid.uuid4().hex[:6]}."
    work = Path(tempfile.mkdtemp(prefix="callmeter-bench-balance-"))
    env = dict(env, CALLMETER_TOPIC_PREFIX=prefix, CALLMETER_DATA_DIR=str(work / "data"))
    env.setdefault("CALLMETER_WORKER_WEB_PORT", "6099")
    ensure_topics(Settings(topic_prefix=prefix, partitions=args.partitions), env["CALLMETER_KAFKA"])
    result: dict[str, object] = bench(env, args.requests, min(args.calls, 200000), rate)
    return result


def _report(args: argparse.Namespace, rows: list[Row], latency: dict[str, object] | None) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"# `make bench` results ({now}, {os.cpu_count()} cores, one local broker)",
        "",
        f"All rows in one run on the same broker; {args.calls:,} records or calls per row, "
        f"{args.partitions} partitions. Ratios are to the straightforward stateful Faust agent.",
    ]
    if rows:
        parts += ["", throughput_table(rows)]
    goals = targets_table(rows, latency, max(int(n) for n in args.processes.split(",")))
    if goals:
        parts += ["", "Targets (issue: throughput at Faust's own ceiling), from the rows above:", "", goals]
    if latency is not None:
        load = (
            f"load paced at {latency.get('load_events_per_s_target')} events/s, 80 % of the fastest worker "
            f"row unless --balance-rate, achieved {latency.get('load_events_per_s_achieved')}; worker "
            f"input lag {latency.get('worker_input_lag_messages_at_start')} → "
            f"{latency.get('worker_input_lag_messages_at_end')} messages during the requests"
        )
        title = f"Balance latency ({args.requests:,} requests each; {load}):"
        parts += ["", title, "", latency_table(latency)]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
