"""What the local Kafka stack needs of this machine (pipeline/local/broker.py and cluster.py): Java and
Maven, free loopback ports, live processes, the JSON state files and admin clients that stay quiet while
a broker is down."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError

HOST = "127.0.0.1"
MIN_JAVA = 17

_MAVEN_BOILERPLATE = (
    "To see the full stack trace",
    "Re-run Maven using",
    "For more information about the errors",
    "[Help ",
    "After correcting the problems",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def find_java() -> str:
    java = shutil.which("java")
    if java is None:
        msg = "Java 17+ is required to run the local Kafka broker: 'java' not found on PATH"
        raise BrokerError(msg)
    try:
        out = subprocess.run(  # noqa: S603 - fixed argv
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"Java 17+ is required to run the local Kafka broker: '{java} -version' failed: {exc}"
        raise BrokerError(msg) from exc
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if m:
        major = int(m.group(1))
        if major == 1 and m.group(2):  # "1.8.0_392"
            major = int(m.group(2))
        if major < MIN_JAVA:
            msg = f"Java 17+ is required to run the local Kafka broker: found Java {major} at {java}"
            raise BrokerError(msg)
    return java


def find_maven() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        msg = "Maven is required once to download the Kafka jars: 'mvn' not found on PATH"
        raise BrokerError(msg)
    return mvn


def maven_error(output: str) -> str:
    """The most telling ``[ERROR]`` line of Maven's output (the last one that is not boilerplate)."""
    lines = [_ANSI.sub("", ln).strip() for ln in output.splitlines()]
    errors = [ln.removeprefix("[ERROR]").strip() for ln in lines if ln.startswith("[ERROR]")]
    errors = [e for e in errors if e and not e.startswith(_MAVEN_BOILERPLATE)]
    if errors:
        error = errors[-1].removesuffix("-> [Help 1]").strip()
        return re.sub(r"^Failed to execute goal on project \S+: ", "", error)
    rest = [ln for ln in lines if ln]
    return rest[-1] if rest else "no output"


def tail_lines(path: Path, lines: int = 8, start: int = 0) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Java listeners set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(exclude: set[int]) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in exclude:
            return port
    msg = "could not find a free loopback port for the local Kafka broker"
    raise BrokerError(msg)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        return False
    return True


def random_cluster_id() -> str:
    """Same shape as ``kafka-storage random-uuid``: 16 random bytes, base64url, no padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def quiet_client_config(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "socket.connection.setup.timeout.ms": 2000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
        "log_level": 0,
        "error_cb": lambda _err: None,
    }


def broker_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    try:
        md = AdminClient(quiet_client_config(bootstrap)).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return bool(md.brokers)


def read_state_file(path: Path) -> dict[str, Any]:
    """A JSON state file written by this module (or pipeline/local/cluster.py); {} when missing or
    unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
