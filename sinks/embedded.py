"""The embedded ledger (chdb) opens in one process at a time: who holds it, asked before opening.

chdb prints its own exception to the terminal when it finds the path locked ("Code: 76. DB::Exception:
Cannot lock file ..."), and that raw line came before callmeter's one-line error (`invoice` during a
run). Asking /proc first gives the one line alone.
"""

from __future__ import annotations

import os

from sinks.errors import LedgerError


def refuse_if_held(path: str) -> None:
    """Raise when another process holds the embedded ledger at ``path`` (chdb opens a path in one
    process only)."""
    holders = _processes_holding(path)
    if holders:
        pids = ", ".join(map(str, holders))
        msg = (
            f"the embedded ledger at {path} is open in another process (pid {pids}, a running "
            "`callmeter worker`?): chdb lets one process open it; stop that process or set "
            "CALLMETER_CLICKHOUSE_URL to a ClickHouse server"
        )
        raise LedgerError(msg)


def _processes_holding(path: str) -> list[int]:
    """Pids (other than ours) with a file under ``path`` open, from /proc; empty where there is none."""
    root = os.path.realpath(path)
    found = []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != os.getpid()]
    except OSError:
        return []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(root + os.sep) for fd in fds):
                found.append(pid)
        except OSError:
            continue
    return found
