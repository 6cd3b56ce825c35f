"""The local single-node Kafka broker (KRaft) behind ``callmeter up`` / ``callmeter down`` (what it needs
of the machine -- Java, Maven, ports, processes -- is in host.py; topics in pipeline/topics.py).

Jars come from Maven Central once (``deploy/kafka/pom.xml``) into ``<cache_dir>/kafka-<version>/libs``; the
broker's state lives in ``<data_dir>/kafka``::

    broker.json          pid, ports, cluster id of the last started broker
    server.properties    generated on every start
    server.out           the JVM's stdout/stderr (startup failures)
    logs/server.log      the broker's log4j2 log
    data/                Kafka log dirs (topics, offsets, transaction state) -- survives ``down``

See docs/broker.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError
from pipeline.local.host import (
    HOST,
    broker_answers,
    find_java,
    find_maven,
    free_port,
    maven_error,
    pid_alive,
    port_free,
    quiet_client_config,
    random_cluster_id,
    read_state_file,
    tail_lines,
)
from pipeline.settings import Settings

log = logging.getLogger(__name__)

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kafka"
POM = DEPLOY_DIR / "pom.xml"
LOG4J2_CONFIG = DEPLOY_DIR / "log4j2.properties"

HEAP = "-Xmx768m"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
FETCH_MARKER = ".fetched"


class LocalKafka:
    """A single-node Kafka (broker + controller) on loopback, run as a detached ``java`` process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = settings.kafka_version
        self.home = settings.cache_dir.expanduser().resolve() / f"kafka-{self.version}"
        self.libs = self.home / "libs"
        self.state_dir = settings.data_dir.expanduser().resolve() / "kafka"
        self.storage_dir = self.state_dir / "data"
        self.log_dir = self.state_dir / "logs"
        self.state_file = self.state_dir / "broker.json"
        self.properties_file = self.state_dir / "server.properties"
        self.server_out = self.state_dir / "server.out"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- jars ---------------------------------------------------------------------------------------

    @property
    def fetched(self) -> bool:
        return (self.home / FETCH_MARKER).is_file()

    def fetch(self) -> Path:
        """Download the broker's jars with Maven unless already cached; returns the libs directory."""
        if self.fetched:
            return self.libs
        self.home.mkdir(parents=True, exist_ok=True)
        with self._flock(self.home / ".lock"):
            if self.fetched:  # another process fetched while we waited
                return self.libs
            mvn = find_maven()
            if not POM.is_file():
                msg = f"cannot fetch Kafka: {POM} is missing (is callmeter installed from its repository?)"
                raise BrokerError(msg)
            staging = self.home / "libs.partial"
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("fetching Kafka %s jars with Maven into %s (one time)", self.version, self.libs)
            argv = [
                mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(POM), f"-Dkafka.version={self.version}",
                "dependency:copy-dependencies", f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
            ]  # fmt: skip
            started = time.monotonic()
            try:
                out = subprocess.run(  # noqa: S603 - fixed argv
                    argv, capture_output=True, text=True, timeout=900, check=False
                )
            except subprocess.TimeoutExpired as exc:
                msg = f"Maven did not finish fetching Kafka {self.version} within 15 minutes"
                raise BrokerError(msg) from exc
            if out.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                msg = f"Maven could not fetch Kafka {self.version}: {maven_error(out.stdout + out.stderr)}"
                raise BrokerError(msg)
            if not any(staging.glob(f"kafka_*-{self.version}.jar")):
                msg = f"Maven ran but no kafka_*-{self.version}.jar appeared in {staging}"
                raise BrokerError(msg)
            shutil.rmtree(self.libs, ignore_errors=True)
            staging.rename(self.libs)
            (self.home / FETCH_MARKER).write_text(
                json.dumps({"version": self.version, "seconds": round(time.monotonic() - started, 1)})
            )
            log.warning("fetched Kafka %s in %.0f s", self.version, time.monotonic() - started)
        return self.libs

    # -- lifecycle ----------------------------------------------------------------------------------

    def up(self, timeout: float = READY_TIMEOUT) -> str:
        """Start the broker unless it already runs; returns its bootstrap address. Idempotent."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._flock(self.state_dir / ".lock"):
            state = self._read_state()
            if self._running(state):
                bootstrap = self._bootstrap(state)
                if not broker_answers(bootstrap):  # maybe still starting
                    self._wait_ready(bootstrap, int(state["pid"]), timeout, log_offset=None)
                return bootstrap
            java = find_java()
            libs = self.fetch()
            port, cport = self._pick_ports(state)
            cluster_id = self._cluster_id(state)
            self._write_properties(port, cport)
            self._format(java, libs, cluster_id)
            pid, offset = self._start(java, libs)
            state = {
                "pid": pid,
                "port": port,
                "controller_port": cport,
                "cluster_id": cluster_id,
                "version": self.version,
                "bootstrap": f"{HOST}:{port}",
                "started_at": time.time(),
            }
            self._write_state(state)
            bootstrap = self._bootstrap(state)
            self._wait_ready(bootstrap, pid, timeout, log_offset=offset)
            return bootstrap

    def down(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop the broker (SIGTERM, SIGKILL after ``timeout`` s); data stays. True if one was running."""
        if not self.state_dir.is_dir():
            return False
        with self._flock(self.state_dir / ".lock"):
            state = self._read_state()
            was_running = self._running(state)
            if was_running:
                self._stop(int(state["pid"]), timeout)
            if state and state.get("pid") is not None:
                state["pid"] = None
                self._write_state(state)
            return was_running

    def status(self) -> dict[str, Any]:
        state = self._read_state()
        running = self._running(state)
        return {
            "running": running,
            "answering": running and broker_answers(self._bootstrap(state)),
            "pid": state.get("pid") if running else None,
            "bootstrap": self._bootstrap(state) if running else None,
            "port": state.get("port"),
            "controller_port": state.get("controller_port"),
            "cluster_id": state.get("cluster_id"),
            "version": state.get("version", self.version),
            "jars_cached": self.fetched,
            "data_dir": str(self.state_dir),
            "log": str(self.log_dir / "server.log"),
        }

    # -- internals ----------------------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _flock(path: Path) -> Iterator[None]:
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_state(self) -> dict[str, Any]:
        return read_state_file(self.state_file)

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    @staticmethod
    def _bootstrap(state: dict[str, Any]) -> str:
        return f"{HOST}:{state['port']}"

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True  # no procfs: trust the pid file
        return b"kafka.Kafka" in cmdline and str(self.properties_file).encode() in cmdline

    def _running(self, state: dict[str, Any]) -> bool:
        pid = state.get("pid")
        return isinstance(pid, int) and pid_alive(pid) and self._is_ours(pid)

    def _pick_ports(self, state: dict[str, Any]) -> tuple[int, int]:
        old = state.get("port"), state.get("controller_port")
        port = old[0] if isinstance(old[0], int) and port_free(old[0]) else free_port(set())
        cport = old[1] if isinstance(old[1], int) and old[1] != port and port_free(old[1]) else 0
        return port, cport or free_port({port})

    def _cluster_id(self, state: dict[str, Any]) -> str:
        meta = self.storage_dir / "meta.properties"
        if meta.is_file():
            m = re.search(r"^cluster\.id=(\S+)", meta.read_text(), re.MULTILINE)
            if m:
                return m.group(1)
        cid = state.get("cluster_id")
        return cid if isinstance(cid, str) and cid else random_cluster_id()

    def _properties(self, port: int, cport: int) -> dict[str, str]:
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{cport}",
            "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.storage_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Aborts transactions of producers that died mid-transaction (tests, killed workers) promptly.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
            "transaction.max.timeout.ms": "900000",
        }

    def _write_properties(self, port: int, cport: int) -> None:
        text = "# Generated by pipeline/local/broker.py on every start; edits are overwritten.\n"
        text += "".join(f"{k}={v}\n" for k, v in self._properties(port, cport).items())
        self.properties_file.write_text(text)

    def _java_argv(self, java: str, libs: Path, main: str, *args: str) -> list[str]:
        argv = [java, HEAP, "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]
        if LOG4J2_CONFIG.is_file():
            argv.append(f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}")
        argv += [f"-Dkafka.logs.dir={self.log_dir}", "-cp", f"{libs}/*", main, *args]
        return argv

    def _format(self, java: str, libs: Path, cluster_id: str) -> None:
        if (self.storage_dir / "meta.properties").is_file():
            return
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        argv = self._java_argv(
            java, libs, "kafka.tools.StorageTool",
            "format", "-t", cluster_id, "-c", str(self.properties_file),
        )  # fmt: skip
        out = subprocess.run(  # noqa: S603 - fixed argv
            argv, capture_output=True, text=True, timeout=120, check=False, cwd=self.state_dir
        )
        if out.returncode != 0:
            lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
            msg = f"formatting Kafka storage in {self.storage_dir} failed: {lines[-1] if lines else '?'}"
            raise BrokerError(msg)

    def _start(self, java: str, libs: Path) -> tuple[int, int]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = self._java_argv(java, libs, "kafka.Kafka", str(self.properties_file))
        with self.server_out.open("ab") as out:
            out.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting Kafka {self.version}\n".encode())
            out.flush()
            offset = out.tell()
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
            )
        return self._proc.pid, offset

    def _log_excerpt(self, log_offset: int | None) -> str:
        lines = tail_lines(self.server_out, start=log_offset or 0)
        if not lines:
            lines = [ln for ln in tail_lines(self.log_dir / "server.log", lines=40) if " ERROR " in ln][-5:]
        if not lines:
            return f"(see {self.log_dir / 'server.log'})"
        return "\n  " + "\n  ".join(lines) + f"\n(full log: {self.log_dir / 'server.log'})"

    def _wait_ready(self, bootstrap: str, pid: int, timeout: float, log_offset: int | None) -> None:
        deadline = time.monotonic() + timeout
        admin = AdminClient(quiet_client_config(bootstrap))
        while True:
            if not pid_alive(pid) or (self._proc is not None and self._proc.poll() is not None):
                msg = f"the local Kafka broker exited during startup:{self._log_excerpt(log_offset)}"
                raise BrokerError(msg)
            with contextlib.suppress(KafkaException):
                if admin.list_topics(timeout=1.0).brokers:
                    return
            if time.monotonic() > deadline:
                self._stop(pid, STOP_TIMEOUT)
                msg = (
                    f"the local Kafka broker did not answer on {bootstrap} within {timeout:.0f} s "
                    f"and was stopped:{self._log_excerpt(log_offset)}"
                )
                raise BrokerError(msg)
            time.sleep(0.2)

    def _stop(self, pid: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            log.warning("Kafka broker %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.2)
                    return True
            elif not pid_alive(pid):
                return True
            else:
                time.sleep(0.2)
        return not pid_alive(pid)
