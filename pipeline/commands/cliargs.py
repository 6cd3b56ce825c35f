"""The `callmeter` command line's arguments (spec §10); pipeline/commands/cli.py runs the commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum`` (argparse turns the error into one
    line and exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            msg = f"{text!r} is not a whole number"
            raise argparse.ArgumentTypeError(msg) from None
        if value < minimum:
            msg = f"must be at least {minimum}, not {value}"
            raise argparse.ArgumentTypeError(msg)
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def rate(text: str) -> float:
    """An argparse type: a share of the events, from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        msg = f"{text!r} is not a number"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        msg = f"must be a share from 0 to 1 (0.02 = 2 %), not {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


# A single broker, or a cluster that survives losing one broker: 3 KRaft controllers keep a majority
# when one dies, 2 do not, and more than 3 add nothing a laptop can show (replication stays 3).
BROKER_COUNTS = (1, 3)


def broker_count(text: str) -> int:
    if text.strip() not in {str(n) for n in BROKER_COUNTS}:
        msg = f"must be 1 (one broker) or 3 (a cluster: replication 3, min ISR 2), not {text}"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts read stderr.
        self.exit(2, f"callmeter: error: {message} (see callmeter --help)\n")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"not a whole number >= 0: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _count_positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        msg = f"must be > 0: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        msg = f"not a number > 0: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="callmeter", description="Usage metering for AI phone agents.")
    parser.add_argument("--data-dir", type=Path, help="state, broker and embedded ClickHouse (./.callmeter)")
    parser.add_argument("--catalog", type=Path, help="pricing catalog YAML (the shipped sample)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("up", help="start the local Kafka broker in the background (idempotent)")
    p.add_argument(
        "--brokers",
        type=broker_count,
        default=None,
        metavar="{1,3}",
        help="1: a single broker (DIR/kafka); 3: a KRaft cluster, replication 3, min ISR 2 "
        "(DIR/kafka-cluster). Default: the stack this data dir already has, else 1",
    )
    sub.add_parser("down", help="stop the local Kafka broker or cluster; data stays")
    p = sub.add_parser("produce", help="publish JSON-lines events, all or nothing")
    p.add_argument("files", nargs="+", metavar="FILE", help="JSON-lines file, or - for standard input")
    p = sub.add_parser("worker", help="run the stream worker")
    p.add_argument("--until-idle", action="store_true", help="exit once everything is consumed and written")
    p = sub.add_parser(
        "sink", help="run the ledger sink alone, beside workers run with CALLMETER_WORKER_LEDGER_SINK=false"
    )
    p.add_argument("--until-idle", action="store_true", help="exit once the workers' outputs are written")
    p = sub.add_parser("invoice", help="write invoices for periods starting in a month")
    p.add_argument("--period", required=True, help="YYYY-MM")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tenant")
    p.add_argument("--finalize", action="store_true", help="make these invoices final (never rewritten)")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="write drafts, marked incomplete, even if the pipeline has not consumed and written everything",
    )
    p = sub.add_parser("replay", help="re-rate calls that started in a time range with the current catalog")
    p.add_argument("--from", dest="ts_from", required=True, help="RFC 3339, inclusive")
    p.add_argument("--to", dest="ts_to", required=True, help="RFC 3339, exclusive")
    p.add_argument("--tenant")
    p.add_argument("--dry-run", action="store_true", help="show the money difference, write nothing")
    p.add_argument("--source", choices=["auto", "kafka", "ledger"], default="auto")
    p.add_argument("--batch-size", type=at_least(1), default=50_000, help="calls per ledger insert")
    p = sub.add_parser("balance", help="print a tenant's live balance (needs a running worker)")
    p.add_argument("tenant")
    p.add_argument("--at", help="RFC 3339 time: the balance of the period containing it (default now)")
    p.add_argument(
        "--url", help="any worker's base URL (default http://127.0.0.1:$CALLMETER_WORKER_WEB_PORT)"
    )
    p = sub.add_parser("alerts", help="print usage and quota alerts readably")
    p.add_argument("--follow", action="store_true", help="keep printing new alerts")
    p = sub.add_parser("notify", help="POST alerts to a webhook, signed, each until it answers 2xx")
    p.add_argument("--webhook", required=True, help="http(s) URL the alerts are POSTed to")
    p.add_argument("--until-idle", action="store_true", help="exit once no alert is left to deliver")
    p = sub.add_parser(
        "status", help="on-call summary of every worker process and the sink; exit 1 when unhealthy"
    )
    p.add_argument(
        "--url",
        help="worker process 0's base URL; process i answers on its port + i "
        "(default http://127.0.0.1:$CALLMETER_WORKER_WEB_PORT)",
    )
    p.add_argument(
        "--sink-url", help="the `callmeter sink` service's base URL (CALLMETER_WORKER_LEDGER_SINK=false)"
    )
    p.add_argument("--max-lag", type=int, default=10000)
    p.add_argument("--max-duplicate-ratio", type=float, default=0.0001)
    p.add_argument("--max-ledger-age", type=float, default=300.0, help="seconds")
    p = sub.add_parser("simulate", help="synthetic gateway traffic")
    p.add_argument("--tenants", type=at_least(1), default=5)
    p.add_argument("--calls", type=at_least(0), default=2000)
    p.add_argument("--month", default="2026-10", help="YYYY-MM of the simulated billing periods")
    p.add_argument("--duplicate-rate", type=rate, default=0.02, help="share of calls resent, 0..1")
    p.add_argument("--late-rate", type=rate, default=0.01, help="share of calls delivered last, 0..1")
    p.add_argument("--invalid-rate", type=rate, default=0.002, help="share of calls unratable, 0..1")
    p.add_argument("--seed", type=int, default=1)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="write JSON lines here")
    where.add_argument("--produce", action="store_true", help="publish directly instead of writing a file")
    p = sub.add_parser(
        "consume",
        help="print the records on a topic, decoded, one JSON object a line (like kcat -C)",
        description="TOPIC: calls, provisioning, calls.rated, provisioning.accepted, alerts, deadletter "
        "or duplicates (the topic prefix is added). Reads committed records only, joins no consumer group "
        "and commits nothing.",
    )
    p.add_argument("topic", metavar="TOPIC")
    p.add_argument(
        "--from-beginning",
        action="store_true",
        help="with --follow: start at the beginning, not at the end (without --follow it always does)",
    )
    p.add_argument("--max", type=at_least(1), metavar="N", help="stop after N records")
    p.add_argument("--follow", action="store_true", help="keep printing new records until interrupted")
    sub.add_parser("ledger", help="ledger row counts and dead letters by reason, as JSON")
    p = sub.add_parser("sql", help="read-only SQL over the ledger (docs/ledger.md), even while a worker runs")
    p.add_argument("query", help="one statement, or - to read it from stdin")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    # clickhouse-client's read-only profile limits: ClickHouse stops a query past them.
    p.add_argument(
        "--max-rows", type=_count, default=10_000, help="rows printed at most, else exit 1 (0: no limit)"
    )
    p.add_argument("--max-seconds", type=_positive, default=60.0, help="the query's time limit")
    p.add_argument("--max-memory-mb", type=_count_positive, default=1024, help="the query's memory limit")
    p = sub.add_parser(
        "usage", help="a tenant's period so far, forecast, daily trend, alerts and top drivers"
    )
    p.add_argument("tenant")
    p.add_argument("--period", help="YYYY-MM: the tenant's period starting in that month (default: current)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the readable review")
    p = sub.add_parser("demo", help="the whole pipeline end to end with a summary")
    p.add_argument("--calls", type=at_least(0), default=3000)
    p.add_argument("--tenants", type=at_least(1), default=5)
    return parser
