"""Opening the ledger's ClickHouse client: ``chdb:///path`` embedded (one process per path), ``http(s)://``
a server; a path another process holds is named with its pid."""

from __future__ import annotations

from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from sinks.cluster import SESSION_SETTINGS
from sinks.errors import LedgerError


def connect(
    dsn: str, password: str | None = None, cluster: str | None = None, settings: dict[str, Any] | None = None
) -> Client:
    """Open a clickhouse-connect client: ``chdb:///path`` embedded, ``http(s)://`` a server. With a
    ``cluster``, the client's session carries sinks/cluster.py's settings (synchronous inserts); with
    ``settings``, those (in order: with the embedded engine each is a SET on this client's own handle)."""
    if cluster and dsn.startswith("chdb:"):
        msg = (
            "clickhouse_cluster needs a ClickHouse server (CALLMETER_CLICKHOUSE_URL), not the embedded ledger"
        )
        raise LedgerError(msg)
    try:
        if dsn.startswith("chdb:"):
            return clickhouse_connect.get_client(dsn=dsn, settings=dict(settings or {}))
        kwargs: dict[str, Any] = {"dsn": dsn}
        if password is not None:
            kwargs["password"] = password
        if cluster or settings:
            kwargs["settings"] = {**(SESSION_SETTINGS if cluster else {}), **(settings or {})}
        return clickhouse_connect.get_client(**kwargs)
    except Exception as exc:  # the driver raises many kinds; the caller needs one
        path = dsn.removeprefix("chdb://")
        holders = _processes_holding(path) if dsn.startswith("chdb:") else []
        if holders:
            pids = ", ".join(map(str, holders))
            msg = (
                f"the embedded ledger at {path} is open in another process (pid {pids}, a running "
                "`callmeter worker`?): chdb lets one process open it; stop that process or set "
                "CALLMETER_CLICKHOUSE_URL to a ClickHouse server"
            )
        else:
            msg = f"cannot open the ClickHouse ledger at {dsn.split('@')[-1]}: {one_line(exc)}"
        raise LedgerError(msg) from exc


def _processes_holding(path: str) -> list[int]:
    """Pids (other than ours) with a file under ``path`` open, from /proc; empty where there is none."""
    import os

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


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
