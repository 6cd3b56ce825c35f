"""`make bench`: worker throughput and peak memory on simulated traffic, on the real broker.

Run as ``python -m pipeline.bench [--calls N]``. It uses its own data dir and topic prefix, starts the
local broker unless CALLMETER_KAFKA is set, produces N call records (plus provisioning), then times
``callmeter worker --until-idle`` in a child process and reads its peak RSS from the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(prog="callmeter-bench")
    parser.add_argument("--calls", type=int, default=int(os.environ.get("BENCH_CALLS", "1000000")))
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="callmeter-bench-"))
    env = dict(os.environ)
    env.update(
        CALLMETER_DATA_DIR=str(work / "data"),
        CALLMETER_TOPIC_PREFIX=f"bench{uuid.uuid4().hex[:6]}.",
        CALLMETER_PARTITIONS=str(args.partitions),
    )
    if not env.get("CALLMETER_KAFKA"):
        from pipeline.broker import LocalKafka

        env["CALLMETER_KAFKA"] = LocalKafka(Settings(data_dir=Path(".callmeter"))).up()

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - our own CLI, fixed argv
            [sys.executable, "-m", "pipeline.cli", *argv], env=env, check=True, capture_output=True, text=True
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

    t1 = time.monotonic()
    proc = cli("worker", "--until-idle")
    worker_s = time.monotonic() - t1
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    consumed = sum(stats["consumed"].values())
    result = {
        "call_records": args.calls,
        "events_consumed": consumed,
        "produce_seconds": round(produce_s, 1),
        "worker_until_idle_seconds": round(worker_s, 1),
        "events_per_second": round(consumed / worker_s),
        "peak_rss_mib": round(peak_kib / 1024),
        "rated": stats["rated"],
        "duplicates": stats["duplicates"],
        "dead_letters": stats["dead_letters"],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
