"""The `callmeter` command line (spec §10). Expected failures print one line on stderr and exit 1;
usage errors exit 2. The commands that read the ledger are in ledger_commands.py."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.commands.cliargs import build_parser
from pipeline.commands.ledger_commands import cmd_invoice, cmd_ledger, cmd_replay, cmd_sql, cmd_usage
from pipeline.errors import BrokerError, InputError, UsageError
from pipeline.local.clients import kafka, make_serde
from pipeline.settings import Settings
from rating.catalog import Catalog
from rating.errors import CallmeterError

if TYPE_CHECKING:
    from pipeline.commands.worker_progress import UntilIdleProgress
    from pipeline.tenantapi.server import TenantApi


def load_catalog(path: Path) -> Catalog:
    from pipeline.catalogs import read_catalog

    return read_catalog(path)[0]


# -- commands ------------------------------------------------------------------------------------------
def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.local.broker import LocalKafka
    from pipeline.local.cluster import LocalKafkaCluster, local_stacks, stack_size
    from pipeline.topics import ensure_topics

    if settings.kafka:
        bootstrap = settings.kafka
    else:
        size = stack_size(*local_stacks(settings), args.brokers, settings.data_dir.expanduser().resolve())
        if size > 1:
            bootstrap = (LocalKafkaCluster.existing(settings) or LocalKafkaCluster(settings, size)).up()
        else:
            bootstrap = LocalKafka(settings).up()
    ensure_topics(settings, bootstrap)
    print(f"kafka ready at {bootstrap}")
    return 0


def cmd_down(settings: Settings, _args: argparse.Namespace) -> int:
    from pipeline.local.broker import LocalKafka
    from pipeline.local.cluster import LocalKafkaCluster

    cluster = LocalKafkaCluster.existing(settings)
    stopped = []
    if cluster is not None and cluster.down():
        stopped.append(f"the {len(cluster.nodes)}-broker cluster in {cluster.dir}")
    local = LocalKafka(settings)
    if local.down():
        stopped.append(f"the broker in {local.state_dir}")
    if stopped:
        print(f"kafka stopped: {' and '.join(stopped)}")
    else:
        # Not an error: `down` is idempotent like `up`. But it must not claim it stopped something.
        external = f" (CALLMETER_KAFKA={settings.kafka} is not started or stopped by callmeter)"
        print(
            f"kafka: nothing was running in {settings.data_dir.expanduser().resolve()}"
            f"{external if settings.kafka else ''}"
        )
    return 0


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.commands.produce import check_input, produce_files
    from pipeline.progress import Progress

    paths = [Path(p) for p in args.files]
    for path in paths:
        check_input(path)
    sent = produce_files(settings, kafka(settings), make_serde(settings), paths, Progress())
    print(" ".join(f"{topic}={n}" for topic, n in sorted(sent.items())) or "nothing to produce")
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.catalogs import read_catalog
    from pipeline.commands.ports import check_ports, own_port_problem, port_plan
    from pipeline.commands.supervisor import (
        SINK_ONLY,
        child_role,
        is_child,
        process_roles,
        restarted,
        supervise,
    )
    from pipeline.errors import RetryableError
    from pipeline.stream.guard import EXIT_RETRY

    if not is_child():
        # `callmeter sink` is this command with one process, the ledger sink (role "sink").
        roles = SINK_ONLY if args.command == "sink" else process_roles(settings)
        # Every port, before anything starts: a taken one is one line now, not a child's traceback.
        check_ports(port_plan(settings, roles, with_api=args.command != "sink"), settings.worker_web_bind)
        if args.command == "sink":
            return supervise(settings, args.argv, SINK_ONLY)
        api = _start_tenant_api(settings)
        progress = _until_idle_progress(settings) if args.until_idle else None
        try:
            return supervise(settings, args.argv)
        finally:
            if progress is not None:
                progress.stop()
            if api is not None:
                api.stop()
    role = child_role()
    taken = own_port_problem(settings, role)
    if taken is not None:
        # Taken since the supervisor checked it: after a fault, maybe only for a moment (retry).
        if restarted():
            print(f"callmeter: error: {taken}; retrying", file=sys.stderr)
            return EXIT_RETRY
        raise InputError(taken)
    catalog, text = read_catalog(settings.catalog)
    try:
        if role == "sink":
            from sinks.process import run_sink

            result = run_sink(settings, kafka(settings), catalog, make_serde(settings), args.until_idle, text)
        else:
            from pipeline.stream.runner import run_worker
            from pipeline.tenantapi.worker_port import install

            stats = run_worker(
                settings,
                kafka(settings),
                catalog,
                make_serde(settings),
                until_idle=args.until_idle,
                catalog_text=text,
                with_sink=role == "worker",
                install_routes=install,
            )
            result = stats.to_dict()
    except RetryableError as exc:
        print(f"callmeter: error: {exc}", file=sys.stderr)
        return EXIT_RETRY
    except BrokerError as exc:
        if not restarted():
            raise
        print(f"callmeter: error: {exc}; retrying", file=sys.stderr)
        return EXIT_RETRY
    print(json.dumps(result, sort_keys=True))
    return 0


def _start_tenant_api(settings: Settings) -> TenantApi | None:
    """The tenant API beside the supervised workers when ``api_port`` is set (pipeline/tenantapi/)."""
    if settings.api_port is None:
        return None
    from pipeline.catalogs import read_catalog
    from pipeline.local.cluster import bootstrap_servers
    from pipeline.tenantapi.ledger_usage import LedgerUsage
    from pipeline.tenantapi.server import TenantApi
    from pipeline.tenantapi.view import ChangelogView

    catalog, _text = read_catalog(settings.catalog)
    ledger = LedgerUsage(settings.clickhouse_dsn, settings.clickhouse_secret, catalog)
    view = ChangelogView(
        lambda: bootstrap_servers(settings),
        settings.app_id,
        settings.partitions,
        settings.dedupe_retention_days,
    )
    try:
        api = TenantApi(view, catalog, settings.worker_web_bind, settings.api_port, ledger)
    except OSError as exc:
        msg = f"tenant API cannot listen on {settings.worker_web_bind}:{settings.api_port}: {exc.strerror}"
        raise InputError(msg) from exc
    api.start()
    return api


def _until_idle_progress(settings: Settings) -> UntilIdleProgress | None:
    """The terminal's progress line for `worker --until-idle` (nothing when stderr is not a terminal)."""
    from pipeline.commands.worker_progress import UntilIdleProgress
    from pipeline.local.cluster import bootstrap_servers
    from pipeline.progress import Progress

    progress = Progress()
    if not progress.enabled:
        return None
    return UntilIdleProgress(settings, bootstrap_servers(settings), progress).start()


def _worker_url(settings: Settings, args: argparse.Namespace) -> str:
    return str(getattr(args, "url", None) or f"http://127.0.0.1:{settings.worker_web_port}").rstrip("/")


def cmd_balance(settings: Settings, args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.parse
    import urllib.request

    url = f"{_worker_url(settings, args)}/balances/{urllib.parse.quote(args.tenant, safe='')}"
    if args.at:
        url += f"?at={urllib.parse.quote(args.at)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - operator-given worker URL
            print(json.dumps(json.loads(resp.read()), indent=2))
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError):
            body = json.loads(body).get("error", body)
        msg = f"balance of {args.tenant}: {body} (HTTP {exc.code})"
        raise InputError(msg) from exc
    except OSError as exc:
        msg = f"no worker answering at {_worker_url(settings, args)}: {exc}"
        raise InputError(msg) from exc
    return 0


def cmd_alerts(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.commands.alerts import follow_alerts

    follow_alerts(settings, kafka(settings, create_topics=False), make_serde(settings), follow=args.follow)
    return 0


def cmd_consume(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.commands.consume import consume

    return consume(settings, kafka(settings, create_topics=False), make_serde(settings), args)


def cmd_notify(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.notify.delivery import prepare_webhook, run_notify

    webhook = prepare_webhook(settings, args.webhook)
    result = run_notify(settings, kafka(settings), make_serde(settings), webhook, args.until_idle)
    print(json.dumps(result, sort_keys=True))
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.commands.status import run_status

    return run_status(settings, args, kafka(settings, create_topics=False))


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.commands.simulate import SimulationConfig, generate, write_file

    year, month = _month(args.month)
    now = datetime.now(UTC)
    if (year, month) > (now.year, now.month):
        # Gateways report finished calls: calls dated after now would be refused as FUTURE_EVENT at
        # best, and inside the tolerance they would use up allowances today (docs/decisions.md).
        message = f"--month {args.month} has not started yet: simulated calls end before now"
        print(f"callmeter: error: {message}", file=sys.stderr)
        return 2
    cfg = SimulationConfig(
        tenants=args.tenants,
        calls=args.calls,
        year=year,
        month=month,
        duplicate_rate=args.duplicate_rate,
        late_rate=args.late_rate,
        invalid_rate=args.invalid_rate,
        seed=args.seed,
        now=now,
    )
    if args.produce:
        from pipeline.commands.produce import EventPublisher
        from schemas.json_events import parse_json_event

        publisher = EventPublisher(settings, kafka(settings), make_serde(settings))
        for event in generate(cfg):
            publisher.publish(*parse_json_event(event))
        publisher.close()
        print(" ".join(f"{t}={n}" for t, n in sorted(publisher.sent.items())))
        return 0
    counts = write_file(cfg, Path(args.out))
    print(f"wrote {args.out}: " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.commands.demo import run_demo

    return run_demo(settings, load_catalog(settings.catalog), args)


def _month(text: str) -> tuple[int, int]:
    from rating.periods import parse_month

    return parse_month(text)


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "produce": cmd_produce,
    "worker": cmd_worker,
    "sink": cmd_worker,
    "invoice": cmd_invoice,
    "balance": cmd_balance,
    "alerts": cmd_alerts,
    "consume": cmd_consume,
    "notify": cmd_notify,
    "status": cmd_status,
    "simulate": cmd_simulate,
    "ledger": cmd_ledger,
    "sql": cmd_sql,
    "usage": cmd_usage,
    "replay": cmd_replay,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.catalog is not None:
        overrides["catalog"] = args.catalog
    logging.basicConfig(
        level=os.environ.get("CALLMETER_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipeline.logfilters import install as quiet_expected_library_logs

    quiet_expected_library_logs()
    started = time.monotonic()
    try:
        settings = Settings(**overrides)
        code = COMMANDS[args.command](settings, args)
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"callmeter: error: setting {first['loc'][0]}: {first['msg']}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"callmeter: error: {exc}", file=sys.stderr)
        return 2
    except CallmeterError as exc:
        print(f"callmeter: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `callmeter alerts | head`: the reader left; not an error of ours.
        sys.stderr.close()
        return 0
    except OSError as exc:
        # A file or directory named on the command line that cannot be read or written (`--out`).
        where = f": {exc.filename}" if exc.filename else ""
        print(f"callmeter: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    logging.getLogger(__name__).debug("%s took %.1fs", args.command, time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
