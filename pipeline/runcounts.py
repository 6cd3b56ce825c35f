"""A worker process's counters as of its last commit, kept in a file for `callmeter worker`'s summary.

`callmeter worker` prints one JSON line of counters when its processes end, the sum of what each
process printed. A process that stopped on a fault (exit 75, kill -9) prints nothing, and its
replacement counts only what it handles itself, so after restarts the summary undercounted: 23,599
consumed calls for a run of 30,600. Counting everything each process handled would overcount instead:
the events of an aborted transaction are handled again by the next process.

So each process writes its counters to the file the supervisor names (``STATS_FILE_ENV``) every time
it commits (the stream worker's transactions, the ledger sink's offsets): exactly the work that
survives it. When a process stops on a fault the supervisor adds that file to the slot's total and
the next process starts from zero; a process that ends normally prints its own line, as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATS_FILE_ENV = "CALLMETER_WORKER_STATS_FILE"


def stats_file() -> Path | None:
    """Where this process keeps its committed counters (set by the supervisor), or None."""
    name = os.environ.get(STATS_FILE_ENV)
    return Path(name) if name else None


def write_committed(path: Path, counters: dict[str, Any]) -> None:
    """Replace the file in one step: a kill in the middle leaves the previous commit's counters."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(counters, sort_keys=True))
    tmp.replace(path)


def read_committed(path: Path) -> dict[str, Any]:
    """The counters the last commit of a stopped process left; {} when it committed nothing."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def add_counters(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Counters summed key by key (one level of nested counters, e.g. consumed per kind)."""
    for key, value in more.items():
        if isinstance(value, dict):
            bucket = total.setdefault(key, {})
            for name, n in value.items():
                bucket[name] = bucket.get(name, 0) + n
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        else:
            total[key] = value
    return total


def ensure_dir(path: Path) -> None:
    os.makedirs(path.parent, exist_ok=True)
