"""`callmeter up --brokers N`: a KRaft cluster of N nodes (each broker and controller) on loopback.

The single broker of `callmeter up` is the everyday stack. A cluster is for rehearsing what a
production cluster does when a broker is lost: topics get replication factor min(3, N), and with
three or more nodes ``min.insync.replicas`` is 2, so a write is acknowledged by two brokers and one
broker may die without losing a committed record or stopping the pipeline. Node i keeps its data,
logs and pid under ``<data dir>/kafka-cluster/node-<i>``; the layout of one node is LocalKafka's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError, InputError
from pipeline.local.broker import LocalKafka
from pipeline.local.host import (
    HOST,
    find_java,
    free_port,
    port_free,
    quiet_client_config,
    random_cluster_id,
    read_state_file,
)
from pipeline.settings import Settings

CLUSTER_DIR = "kafka-cluster"
READY_TIMEOUT = 120.0


class _Node(LocalKafka):
    """One node of the cluster: LocalKafka's process handling, the cluster's properties."""

    def __init__(self, settings: Settings, node_id: int, size: int) -> None:
        super().__init__(settings)
        self.node_id = node_id
        self.size = size
        self.voters = ""
        self.state_dir = settings.data_dir.expanduser().resolve() / CLUSTER_DIR / f"node-{node_id}"
        self.storage_dir = self.state_dir / "data"
        self.log_dir = self.state_dir / "logs"
        self.state_file = self.state_dir / "broker.json"
        self.properties_file = self.state_dir / "server.properties"
        self.server_out = self.state_dir / "server.out"

    def _properties(self, port: int, cport: int) -> dict[str, str]:
        props = super()._properties(port, cport)
        replication = str(min(3, self.size))
        min_isr = "2" if self.size >= 3 else "1"
        props.update(
            {
                "node.id": str(self.node_id),
                "controller.quorum.voters": self.voters,
                "default.replication.factor": replication,
                "min.insync.replicas": min_isr,
                "offsets.topic.replication.factor": replication,
                "transaction.state.log.replication.factor": replication,
                "transaction.state.log.min.isr": min_isr,
                "share.coordinator.state.topic.replication.factor": replication,
                "share.coordinator.state.topic.min.isr": min_isr,
            }
        )
        return props


class LocalKafkaCluster:
    def __init__(self, settings: Settings, size: int) -> None:
        if size < 1:
            msg = f"a cluster needs at least one broker, not {size}"
            raise BrokerError(msg)
        self.settings = settings
        self.dir = settings.data_dir.expanduser().resolve() / CLUSTER_DIR
        self.state_file = self.dir / "cluster.json"
        self.nodes = [_Node(settings, i + 1, size) for i in range(size)]

    @classmethod
    def existing(cls, settings: Settings) -> LocalKafkaCluster | None:
        """The cluster `up --brokers` made in this data dir, if any."""
        state = read_state_file(settings.data_dir.expanduser().resolve() / CLUSTER_DIR / "cluster.json")
        return cls(settings, int(state["size"])) if "size" in state else None

    def running_bootstrap(self) -> str:
        """Addresses of the nodes that run now ("" if none)."""
        return ",".join(
            f"{HOST}:{state['port']}" for node in self.nodes if node._running(state := node._read_state())
        )

    def up(self, timeout: float = READY_TIMEOUT) -> str:
        """Start every node that is not running; return the bootstrap list once all of them answer."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with LocalKafka._flock(self.dir / ".lock"):
            cluster = self._read_state()
            ports = self._ports(cluster)
            voters = ",".join(f"{n.node_id}@{HOST}:{c}" for n, (_p, c) in zip(self.nodes, ports, strict=True))
            cluster_id = str(cluster.get("cluster_id") or random_cluster_id())
            java = find_java()
            libs = self.nodes[0].fetch()
            for node, (port, cport) in zip(self.nodes, ports, strict=True):
                node.state_dir.mkdir(parents=True, exist_ok=True)
                if node._running(node._read_state()):
                    continue
                node.voters = voters
                node._write_properties(port, cport)
                node._format(java, libs, cluster_id)
                pid, _offset = node._start(java, libs)
                node._write_state(
                    {"pid": pid, "port": port, "controller_port": cport, "cluster_id": cluster_id}
                )
            summary = {"size": len(self.nodes), "cluster_id": cluster_id, "ports": ports}
            self.state_file.write_text(json.dumps(summary, indent=2) + "\n")
            bootstrap = ",".join(f"{HOST}:{port}" for port, _c in ports)
            self._wait_ready(bootstrap, timeout)
            return bootstrap

    def down(self, timeout: float = 20.0) -> bool:
        """Stop every node at once: stopped one by one, the last ones wait for a controller quorum
        that is already gone. After ``timeout`` s a node still running is killed; data stays."""
        pids = []
        for node in self.nodes:
            state = node._read_state()
            if node._running(state):
                pids.append((node, int(state["pid"])))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(state["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node, pid in pids:
            if not node._wait_exit(pid, max(deadline - time.monotonic(), 0.1)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                node._wait_exit(pid, 10)
        return bool(pids)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (fault tests): no shutdown, no leadership hand-over."""
        node = self.nodes[node_id - 1]
        state = node._read_state()
        if node._running(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(state["pid"]), signal.SIGKILL)
            node._wait_exit(int(state["pid"]), 30)

    def _read_state(self) -> dict[str, Any]:
        return read_state_file(self.state_file)

    def _ports(self, cluster: dict[str, Any]) -> list[tuple[int, int]]:
        """Each node keeps its ports across restarts (the voters list names them) unless taken."""
        old = [tuple(p) for p in cluster.get("ports", [])]
        if len(old) == len(self.nodes):
            alive = [node._running(node._read_state()) for node in self.nodes]
            if all(a or (port_free(p) and port_free(c)) for a, (p, c) in zip(alive, old, strict=True)):
                return [(int(p), int(c)) for p, c in old]
        used: set[int] = set()
        ports = []
        for _node in self.nodes:
            port = free_port(used)
            used.add(port)
            cport = free_port(used)
            used.add(cport)
            ports.append((port, cport))
        return ports

    def _wait_ready(self, bootstrap: str, timeout: float) -> None:
        admin = AdminClient(quiet_client_config(bootstrap))
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(KafkaException):
                if len(admin.list_topics(timeout=2.0).brokers) == len(self.nodes):
                    return
            if time.monotonic() > deadline:
                logs = ", ".join(str(node.log_dir / "server.log") for node in self.nodes)
                msg = f"local Kafka cluster: not {len(self.nodes)} brokers after {timeout:.0f} s ({logs})"
                raise BrokerError(msg)
            time.sleep(0.5)


def stack_size(single: bool, cluster: int | None, requested: int | None, data_dir: Path) -> int:
    """How many brokers `callmeter up` starts in ``data_dir``: the stack it already has, never a second
    one beside it. ``single``: the dir holds a single broker's data; ``cluster``: the size of the
    cluster it holds (None: none); ``requested``: ``--brokers`` (None: not given). A second, empty
    stack would take over every later command (they use the cluster when one runs), so the data of
    the first would look lost."""
    single_dir, cluster_dir = data_dir / "kafka", data_dir / CLUSTER_DIR
    elsewhere = "use another --data-dir for it, or `callmeter down` and delete"
    if requested is None:
        if single and cluster:
            msg = (
                f"{data_dir} holds two Kafka stacks, a single broker ({single_dir}) and a {cluster}-broker "
                f"cluster ({cluster_dir}); say which with --brokers 1 or --brokers {cluster}"
            )
            raise InputError(msg)
        return cluster or 1
    if cluster and requested != cluster and not (single and requested == 1):
        msg = (
            f"{data_dir} holds a {cluster}-broker cluster ({cluster_dir}); a "
            f"{'single broker' if requested == 1 else f'{requested}-broker cluster'} would start empty "
            f"beside it: run `callmeter up` to start the cluster, or {elsewhere} {cluster_dir}"
        )
        raise InputError(msg)
    if single and requested > 1 and not cluster:
        msg = (
            f"{data_dir} holds a single broker ({single_dir}); a {requested}-broker cluster would start "
            f"empty beside it: run `callmeter up` to start the broker, or {elsewhere} {single_dir}"
        )
        raise InputError(msg)
    return requested


def local_stacks(settings: Settings) -> tuple[bool, int | None]:
    """(the data dir holds a single broker's data, the size of the cluster it holds or None)."""
    single = (LocalKafka(settings).storage_dir / "meta.properties").is_file()
    cluster = LocalKafkaCluster.existing(settings)
    return single, len(cluster.nodes) if cluster is not None else None


def bootstrap_servers(settings: Settings) -> str:
    """``settings.kafka`` if set, else the address of the running local cluster or broker."""
    if settings.kafka:
        return settings.kafka
    cluster = LocalKafkaCluster.existing(settings)
    if cluster is not None:
        running = cluster.running_bootstrap()
        if running:
            return running
    local = LocalKafka(settings)
    state = local._read_state()
    if not local._running(state):
        msg = "no local broker running; run `callmeter up` or set CALLMETER_KAFKA"
        raise BrokerError(msg)
    return local._bootstrap(state)
