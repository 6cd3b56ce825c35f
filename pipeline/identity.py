"""Which pipeline a process belongs to, so `callmeter status` counts its own processes and no others.

A port says nothing about who listens on it: another pipeline on the same host (a second data dir, a
test, staging) may run its workers on the same ports. Every worker and sink process therefore states
its pipeline in its ``/status``: the Kafka cluster it consumes from and its application id (the
consumer group, derived from the topic prefix), with its data dir, its ledger, its role and pid. Two
processes are of one pipeline when they share the cluster and the application id: then they share the
consumer group, its partitions and its topics, whatever port they listen on. A process that has not
reached Kafka yet (no cluster id) is recognised by its data dir instead.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.settings import Settings

# Set by `callmeter worker` for each process it starts (pipeline/commands/supervisor.py): ``worker``
# (stream worker with the ledger sink inside), ``stream`` (without) or ``sink``.
ROLE_ENV = "CALLMETER_WORKER_ROLE"
_learned: dict[str, str] = {}


def process_role() -> str:
    return os.environ.get(ROLE_ENV, "worker")


def remember_cluster_id(cluster_id: str | None) -> None:
    """The Kafka cluster id this process's clients reached (from any metadata answer)."""
    if cluster_id:
        _learned["kafka_cluster_id"] = str(cluster_id)


def ledger_location(settings: Settings) -> str:
    """Where the ledger is, without credentials: a chdb path or a server's host, port and database."""
    dsn = settings.clickhouse_dsn
    return dsn.removeprefix("chdb://") if dsn.startswith("chdb:") else dsn.split("@")[-1]


def describe(settings: Settings, role: str | None = None) -> dict[str, Any]:
    """This process, as its ``/status`` states it."""
    return {
        "app_id": settings.app_id,
        "topic_prefix": settings.topic_prefix,
        "kafka_cluster_id": _learned.get("kafka_cluster_id"),
        "data_dir": str(settings.data_dir.resolve()),
        "ledger": ledger_location(settings),
        "role": role or process_role(),
        "index": settings.worker_index,
        "pid": os.getpid(),
    }


def stranger(mine: dict[str, Any], theirs: dict[str, Any] | None) -> str | None:
    """None when ``theirs`` (a process's stated identity) is of the pipeline ``mine`` describes; else
    a short description of whose it is."""
    if not isinstance(theirs, dict) or "app_id" not in theirs:
        return "a process that does not state its pipeline (not a callmeter worker of this version)"
    cluster = theirs.get("kafka_cluster_id")
    reached = cluster or "not reached yet"
    whose = f"pipeline {theirs['app_id']} (Kafka cluster {reached}, data dir {theirs.get('data_dir')})"
    if theirs["app_id"] != mine["app_id"]:
        return whose
    if cluster and mine.get("kafka_cluster_id"):
        return None if cluster == mine["kafka_cluster_id"] else whose
    return None if theirs.get("data_dir") == mine["data_dir"] else whose
