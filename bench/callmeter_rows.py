"""Worker throughput and peak memory on simulated traffic, on the real broker, and balance latency:
the callmeter rows of `make bench`'s table (bench/table.py), also runnable alone as JSON.

Run as ``python -m bench.callmeter_rows [--calls N]``. It uses its own data dir and topic prefix,
starts the local broker unless CALLMETER_KAFKA is set, produces N call records (plus provisioning), then times
``callmeter worker --until-idle`` in a child process and reads its peak RSS from the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.settings import Settings


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _authorize_buckets(url: str) -> list[tuple[float, float]]:
    """(bound in seconds, cumulative count) of the worker's authorize latency histogram."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - local worker
        text = resp.read().decode()
    prefix = 'callmeter_tenant_api_request_duration_seconds_bucket{endpoint="authorize",'
    return [
        (float(line.split('le="')[1].split('"')[0]), float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(prefix)
    ]


def _bound_ms(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float | None:
    """The smallest bucket bound (ms) under which a share ``q`` of the samples between two scrapes fall."""
    counts = [(bound, n - dict(before).get(bound, 0.0)) for bound, n in after]
    if not counts or counts[-1][1] == 0:
        return None
    return next(round(bound * 1000, 3) for bound, n in counts if n >= q * counts[-1][1])


def balance_bench(
    env: dict[str, str], requests: int, load_calls: int, rate_per_s: float
) -> dict[str, object]:
    """Balance and pre-call authorization latency (HTTP round trips on loopback, as a gateway sees them)
    and produce-to-balance freshness of every call, under simulated load paced at ``rate_per_s``."""
    import random
    import urllib.error
    import urllib.request

    from confluent_kafka import Producer

    from bench.load import PacedLoad, freshness_ms
    from pipeline.local.clients import make_serde
    from schemas.json_events import parse_json_event

    port = env["CALLMETER_WORKER_WEB_PORT"]
    base = f"http://127.0.0.1:{port}"
    # The tenant API (pipeline/tenantapi/) in the worker command's own process, beside the stream
    # workers: what a gateway should ask before each call.
    env = dict(env)
    api = f"http://127.0.0.1:{env.setdefault('CALLMETER_API_PORT', str(int(port) - 1))}"
    settings = Settings(
        topic_prefix=env["CALLMETER_TOPIC_PREFIX"], partitions=int(env["CALLMETER_PARTITIONS"])
    )
    serde = make_serde(settings)
    producer = Producer(
        {"bootstrap.servers": env["CALLMETER_KAFKA"], "partitioner": "murmur2_random", "linger.ms": 0}
    )

    def publish(event: dict[str, Any]) -> None:
        name, record = parse_json_event(event)
        topic = settings.topics.calls if name == "CallRecord" else settings.topics.provisioning
        producer.produce(
            topic, key=str(record["tenant_id"]).encode(), value=serde.encode(name, record, topic)
        )
        producer.flush(10)

    sub = {
        "type": "provisioning",
        "event_id": "fresh-sub",
        "tenant_id": "fresh",
        "occurred_at": "2026-10-01T00:00:00Z",
        "action": "SUBSCRIPTION_STARTED",
        "plan_id": "starter",
        "tax_region": "NONE",
        "number": None,
        "number_type": None,
        "employee_id": None,
    }
    publish(sub)
    log = Path(env["CALLMETER_DATA_DIR"]).with_suffix(".worker.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as err:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker"], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    try:

        def get(path: str, at: str = base) -> dict[str, Any]:
            try:
                with urllib.request.urlopen(at + path, timeout=10) as resp:  # noqa: S310 - local worker
                    return dict(json.loads(resp.read()))
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return {}
                raise

        deadline = time.monotonic() + 120
        while True:
            try:
                if get("/balances/fresh?at=2026-10-15T00:00:00Z").get("tenant_id") == "fresh":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                msg = "worker did not come up"
                raise RuntimeError(msg)
            time.sleep(0.2)
        while get("/balances/fresh?at=2026-10-15T00:00:00Z", api).get("tenant_id") != "fresh":
            if time.monotonic() > deadline:
                msg = "tenant API did not come up"
                raise RuntimeError(msg)
            time.sleep(0.2)

        # Idle baseline: the same authorization request with nothing else running, so the figure under
        # load below can be told apart from what the endpoint itself costs.
        idle = []
        for _ in range(min(requests, 500)):
            t0 = time.perf_counter()
            get("/authorize/fresh")
            idle.append(time.perf_counter() - t0)
        api_idle = []
        for _ in range(min(requests, 500)):
            t0 = time.perf_counter()
            get("/authorize/fresh", api)
            api_idle.append(time.perf_counter() - t0)

        # Load: simulated traffic published at a fixed pace (PacedLoad), not a flood: the figures are
        # for a worker keeping up at the given share of its sustained rate.
        load = PacedLoad(env["CALLMETER_KAFKA"], settings, serde, rate_per_s, load_calls)
        load_started_ms = int(time.time() * 1000)
        load_t0 = time.monotonic()
        load.start()
        tenants = [f"tenant-{i:04d}" for i in range(1, 21)]
        deadline = time.monotonic() + 120
        while not all(get(f"/balances/{t}?at=2026-10-20T00:00:00Z") for t in tenants):
            if time.monotonic() > deadline:
                msg = "simulated tenants never became known"
                raise RuntimeError(msg)
            time.sleep(0.2)
        lag_before = sum(row["messages"] for row in get("/status")["lag"])
        buckets_before = _authorize_buckets(base + "/metrics")
        rng = random.Random(1)  # noqa: S311 - benchmark traffic
        # Balance and pre-call authorization requests, to the worker and to the tenant API, take turns,
        # so all four meet the same load.
        names = ("balance", "authorize", "api_balance", "api_authorize")
        timed: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(requests):
            for name, path, at in (
                ("balance", f"/balances/{rng.choice(tenants)}?at=2026-10-20T00:00:00Z", base),
                ("authorize", f"/authorize/{rng.choice(tenants)}", base),
                ("api_balance", f"/balances/{rng.choice(tenants)}?at=2026-10-20T00:00:00Z", api),
                ("api_authorize", f"/authorize/{rng.choice(tenants)}", api),
            ):
                t0 = time.perf_counter()
                get(path, at)
                timed[name].append(time.perf_counter() - t0)
        api_status = get("/status", api)
        served_within = _bound_ms(buckets_before, _authorize_buckets(base + "/metrics"), 0.99)
        consumed_during = get("/status")["stats"]["consumed"]
        lag_after = sum(row["messages"] for row in get("/status")["lag"])
        load.stopped.set()
        load.join()
        load_seconds = time.monotonic() - load_t0
        if load.error is not None:
            raise load.error
        time.sleep(3)  # the last calls' rated records
        fresh = freshness_ms(env["CALLMETER_KAFKA"], settings, serde, load_started_ms)
    finally:
        worker.terminate()
        worker.wait(60)
    ms = {
        f"{name}_latency_ms_p{q}": round(_percentile(values, q / 100) * 1000, 2)
        for name, values in timed.items()
        for q in (50, 99)
    }
    return {
        "requests_each": requests,
        **ms,
        "authorize_latency_ms_p99_idle": round(_percentile(idle, 0.99) * 1000, 2),
        "api_authorize_latency_ms_p99_idle": round(_percentile(api_idle, 0.99) * 1000, 2),
        # How stale the tenant API's committed view was when the requests ended.
        "api_seconds_since_last_change": api_status.get("seconds_since_last_change"),
        # From the worker's own histogram: 99 % of authorizations took at most this long inside the
        # handler; the rest of the round trip above is waiting for the event loop and the CPU.
        "authorize_handler_ms_p99_at_most": served_within,
        "worker_input_lag_messages_at_start": lag_before,
        "worker_input_lag_messages_at_end": lag_after,
        "worker_consumed_by_end": consumed_during,
        "load_events_per_s_target": round(rate_per_s),
        "load_events_per_s_achieved": round(load.achieved_rate(load_seconds)),
        "produce_to_balance_calls": len(fresh),
        "produce_to_balance_ms_p50": round(_percentile(fresh, 0.5), 1) if fresh else None,
        "produce_to_balance_ms_p99": round(_percentile(fresh, 0.99), 1) if fresh else None,
        "produce_to_balance_ms_max": round(max(fresh), 1) if fresh else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="callmeter-bench")
    parser.add_argument("--balance", action="store_true", help="balance latency under load instead")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--balance-rate", type=float, default=500.0, help="events/s of the paced load")
    parser.add_argument("--calls", type=int, default=int(os.environ.get("BENCH_CALLS", "1000000")))
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--processes", default="1", help="stream worker processes; a comma list runs each, side by side"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="callmeter-bench-"))
    env = dict(os.environ)
    env.update(
        CALLMETER_DATA_DIR=str(work / "data"),
        CALLMETER_TOPIC_PREFIX=f"bench{uuid.uuid4().hex[:6]}.",
        CALLMETER_PARTITIONS=str(args.partitions),
    )
    if not env.get("CALLMETER_KAFKA"):
        from pipeline.local.broker import LocalKafka

        env["CALLMETER_KAFKA"] = LocalKafka(Settings(data_dir=Path(".callmeter"))).up()
    if args.balance:
        env.setdefault("CALLMETER_WORKER_WEB_PORT", "6099")
        from pipeline.topics import ensure_topics

        ensure_topics(
            Settings(topic_prefix=env["CALLMETER_TOPIC_PREFIX"], partitions=args.partitions),
            env["CALLMETER_KAFKA"],
        )
        rate = args.balance_rate
        print(json.dumps(balance_bench(env, args.requests, min(args.calls, 200000), rate), indent=2))
        return 0

    results = [throughput(env, args, work, int(n)) for n in args.processes.split(",")]
    print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 0


def throughput(env: dict[str, str], args: argparse.Namespace, work: Path, processes: int) -> dict[str, Any]:
    """Produce the simulated month on fresh topics, then time `worker --until-idle` with ``processes``
    stream worker processes. Each count gets its own topics and data dir, on the same broker."""
    env = dict(
        env,
        CALLMETER_DATA_DIR=str(work / f"data-{processes}"),
        CALLMETER_TOPIC_PREFIX=f"bench{uuid.uuid4().hex[:6]}.",
        CALLMETER_WORKER_PROCESSES=str(processes),
    )

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - our own CLI, fixed argv
            [sys.executable, "-m", "pipeline", *argv], env=env, check=True, capture_output=True, text=True
        )

    t0 = time.monotonic()
    cli(
        "simulate",
        "--produce",
        "--tenants",
        str(args.tenants),
        "--calls",
        str(args.calls),
        "--duplicate-rate",
        "0.01",
        "--late-rate",
        "0.01",
        "--invalid-rate",
        "0.001",
        "--seed",
        "42",
    )
    produce_s = time.monotonic() - t0

    from bench.refs import run_child
    from bench.steady import CommitProbe

    prefix = env["CALLMETER_TOPIC_PREFIX"]
    settings = Settings(topic_prefix=prefix, partitions=int(env["CALLMETER_PARTITIONS"]))
    probe = CommitProbe(env["CALLMETER_KAFKA"], settings.app_id, settings.topics.inputs)
    probe.start()
    try:
        worker = run_child(
            [sys.executable, "-m", "pipeline", "worker", "--until-idle"], env, timeout_s=6 * 3600
        )
    finally:
        net = probe.stop()
    if worker.returncode != 0:
        tail = " ".join(worker.stderr.strip().splitlines()[-1:])[:300]
        msg = f"worker --until-idle exited {worker.returncode}: {tail}"
        raise RuntimeError(msg)
    worker_s = worker.wall_seconds
    stats = json.loads(worker.stdout.strip().splitlines()[-1])
    consumed = sum(stats["consumed"].values())
    return {
        "worker_processes": processes,
        "call_records": args.calls,
        "events_consumed": consumed,
        "produce_seconds": round(produce_s, 1),
        "worker_until_idle_seconds": round(worker_s, 1),
        "events_per_second": round(consumed / worker_s),
        # Net of start-up and of the idle check at the end (bench/steady.py).
        **net,
        # This run's alone (wait4): the largest of the worker command and the processes it started.
        "peak_rss_mib_largest_process": worker.peak_rss_mib,
        "cpu_seconds": round(worker.cpu_seconds, 1),
        "rated": stats["rated"],
        "duplicates": stats["duplicates"],
        "duplicates_in_ledger": stats.get("duplicates_in_ledger", {}),
        "dead_letters": stats["dead_letters"],
        # Where this run's month lives, for a replay of it afterwards (bench/table.py).
        "topic_prefix": env["CALLMETER_TOPIC_PREFIX"],
        "data_dir": env["CALLMETER_DATA_DIR"],
    }


if __name__ == "__main__":
    sys.exit(main())
