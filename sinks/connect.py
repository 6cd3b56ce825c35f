"""Opening the ledger's ClickHouse client: ``chdb:///path`` embedded (one process per path), ``http(s)://``
a server; a path another process holds is named with its pid."""

from __future__ import annotations

from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from sinks.cluster import SESSION_SETTINGS
from sinks.embedded import refuse_if_held
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
    if dsn.startswith("chdb:"):
        # Asked before opening: chdb prints its own exception to the terminal when the path is locked,
        # and that raw line would come before this one.
        refuse_if_held(dsn.removeprefix("chdb://"))
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
        if dsn.startswith("chdb:"):
            refuse_if_held(dsn.removeprefix("chdb://"))  # taken in the meantime
        msg = f"cannot open the ClickHouse ledger at {dsn.split('@')[-1]}: {one_line(exc)}"
        raise LedgerError(msg) from exc


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
