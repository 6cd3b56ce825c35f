"""The ports `callmeter worker` and `callmeter sink` listen on, checked before any process starts.

The layout (README, "The worker's HTTP port"): with N stream worker processes, process i serves its web
API on ``worker_web_port + i``; the ledger sink process, when it runs beside them (N > 1), on
``worker_web_port + N``; one process in all (N = 1) uses ``worker_web_port`` itself, as does a
`callmeter sink` service. The tenant API, when ``api_port`` is set, listens on that port in the
supervising process. A port taken by another program used to surface only as a traceback in the child
that failed to bind it, restarted with back-off until the restart budget ran out (70 s of noise);
checking every port first turns it into one line at once.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import NamedTuple

from pipeline.errors import InputError, UsageError
from pipeline.settings import Settings

_MAX_PORT = 65535


class Listener(NamedTuple):
    port: int
    who: str
    api: bool = False  # the tenant API (its own setting) rather than a worker process


def describe(role: str, index: int) -> str:
    """Who listens on ``worker_web_port + index`` (``role`` as the supervisor names its processes)."""
    offset = f"CALLMETER_WORKER_WEB_PORT + {index}" if index else "CALLMETER_WORKER_WEB_PORT"
    who = {
        "worker": "the worker's web port",
        "stream": f"the web port of stream worker process {index}",
        "sink": "the ledger sink's metrics port",
    }.get(role, f"the web port of {role} process {index}")
    return f"{who} ({offset})"


def port_plan(settings: Settings, roles: Iterable[tuple[str, int]], with_api: bool = True) -> list[Listener]:
    """Every port a run with these process roles listens on, and who listens there."""
    plan = [Listener(settings.worker_web_port + index, describe(role, index)) for role, index in roles]
    if with_api and settings.api_port is not None:
        plan.append(Listener(settings.api_port, "the tenant API (CALLMETER_API_PORT)", api=True))
    return plan


def clash(plan: list[Listener]) -> str | None:
    """A setting problem in the plan itself (a port out of range, two users of one port), or None."""
    users: dict[int, str] = {}
    workers = [listener.port for listener in plan if not listener.api]
    span = f"{min(workers)}..{max(workers)}" if len(workers) > 1 else str(workers[0]) if workers else ""
    for port, who, _api in plan:
        if not 0 < port <= _MAX_PORT:
            return f"port {port}, {who}, is not a TCP port (1..{_MAX_PORT}); choose a lower base port"
        if port in users:
            return (
                f"port {port} is both {users[port]} and {who}: this run's processes use {span}; "
                "give the tenant API (CALLMETER_API_PORT) a port outside that range"
            )
        users[port] = who
    return None


def unavailable(host: str, port: int) -> str | None:
    """Why nothing could listen on ``host:port`` right now, or None when it can. Binds as the servers
    do (SO_REUSEADDR: a port with only old connections in TIME_WAIT is free)."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        return f"cannot resolve the bind address {host!r} (CALLMETER_WORKER_WEB_BIND): {exc.strerror}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "already in use by another program"
            if exc.errno == errno.EACCES:
                return "not allowed (ports below 1024 need privileges)"
            return exc.strerror or str(exc)
    return None


def check_ports(plan: list[Listener], host: str) -> None:
    """Raise UsageError (exit 2) when the settings contradict each other, InputError (exit 1) when a
    port is taken; nothing has been started either way."""
    problem = clash(plan)
    if problem is not None:
        raise UsageError(problem)
    for port, who, _api in plan:
        why = unavailable(host, port)
        if why is not None:
            msg = (
                f"cannot listen on {host}:{port}, {who}: {why}; stop what holds it or choose "
                "another base port (CALLMETER_WORKER_WEB_PORT / CALLMETER_API_PORT)"
            )
            raise InputError(msg)


def own_port_problem(settings: Settings, role: str) -> str | None:
    """In a worker or sink process: why it cannot listen on its own port (``worker_web_port`` is
    already its own, base + index), or None."""
    why = unavailable(settings.worker_web_bind, settings.worker_web_port)
    if why is None:
        return None
    who = describe(role, settings.worker_index)
    return f"cannot listen on {settings.worker_web_bind}:{settings.worker_web_port}, {who}: {why}"
