"""The pipeline's topics: created when missing, with the right partition counts, before anyone uses them.

Works on any cluster (`callmeter up`'s broker or cluster, or ``CALLMETER_KAFKA``). Replication factor is
min(3, brokers in the cluster).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.errors import BrokerError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# Input records carry the broker's append time, not the producer's clock: the worker measures an event's
# own time against it (a call dated far past it is a clock fault, rating/timing.py), and a gateway's
# clock must not decide that. Set when callmeter creates the topics; an existing topic keeps its own.
INPUT_TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}


def _input_partitions(settings: Settings, counts: dict[str, int]) -> int | None:
    existing = {t: counts[t] for t in settings.topics.inputs if t in counts}
    if len(set(existing.values())) > 1:
        detail = ", ".join(f"{t} has {n}" for t, n in existing.items())
        msg = f"input topics must be co-partitioned (same partition count): {detail}"
        raise BrokerError(msg)
    return next(iter(existing.values()), None)


def ensure_topics(settings: Settings, bootstrap: str) -> None:
    """Create the pipeline's topics that are missing. Idempotent.

    New topics get ``settings.partitions`` partitions, except that a missing input topic gets the partition
    count of the existing other input topic (inputs must be co-partitioned); inputs that already disagree
    raise :class:`BrokerError`. Replication factor is ``min(3, number of brokers)``.

    A broker's metadata can lag a creation by someone else (seen under load: a topic created a moment
    before was absent from the listing), so the inputs are created one at a time, and one that turns out
    to exist is waited for and its real partition count used for the other; at the end every topic must
    be visible, and the inputs are checked on that complete view.
    """
    if settings.partitions < 1:
        msg = f"partitions must be at least 1, not {settings.partitions}"
        raise BrokerError(msg)
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "error_cb": lambda _err: None, "log_level": 0}
    admin = AdminClient(conf)
    md = _metadata(admin, bootstrap)
    counts = _counts(md)
    replication = min(3, max(1, len(md.brokers)))
    for name in settings.topics.inputs:
        if name in counts:
            continue
        partitions = _input_partitions(settings, counts) or settings.partitions
        if _create_topics(
            admin, [NewTopic(name, partitions, replication, config=INPUT_TOPIC_CONFIG)], bootstrap
        ):
            log.info("created topic %s", name)
        counts = _visible(admin, bootstrap, [name])
    _input_partitions(settings, counts)
    others = [NewTopic(n, settings.partitions, replication) for n in settings.topics.all if n not in counts]
    if others:
        created = _create_topics(admin, others, bootstrap)
        if created:
            log.info("created topics %s", ", ".join(created))
    # Someone may have created an input concurrently with another count: check the complete view.
    _input_partitions(settings, _visible(admin, bootstrap, settings.topics.all))


def _metadata(admin: AdminClient, bootstrap: str) -> Any:
    try:
        return admin.list_topics(timeout=15)
    except KafkaException as exc:
        msg = f"cannot reach Kafka at {bootstrap}: {exc.args[0] if exc.args else exc}"
        raise BrokerError(msg) from exc


def _counts(md: Any) -> dict[str, int]:
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def _visible(admin: AdminClient, bootstrap: str, names: list[str], timeout: float = 60.0) -> dict[str, int]:
    """Partition counts of every topic, once the metadata shows all of ``names``."""
    deadline = time.monotonic() + timeout
    while True:
        counts = _counts(_metadata(admin, bootstrap))
        missing = [n for n in names if n not in counts]
        if not missing:
            return counts
        if time.monotonic() > deadline:
            msg = f"topics {', '.join(missing)} are still not in the cluster metadata after {timeout:.0f} s"
            raise BrokerError(msg)
        time.sleep(0.2)


def ensure_internal_topics(
    bootstrap: str, topics: dict[str, tuple[int, dict[str, str]]], timeout: float = 60.0
) -> None:
    """Create the worker's internal topics (table changelogs, Faust's leader topic) that are missing,
    then wait until the cluster's metadata shows every one with its partition count.

    Faust creates them itself, but on a fresh cluster its agents could start before the new topics
    were in the client's metadata ("changelog topic ... has 0 partitions") and crash mid-event (issue 9).
    A changelog with another partition count than the inputs is refused: state would be mis-assigned."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "error_cb": lambda _err: None, "log_level": 0}
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout
    while True:
        try:
            md = admin.list_topics(timeout=10)
        except KafkaException as exc:
            msg = f"cannot reach Kafka at {bootstrap}: {exc.args[0] if exc.args else exc}"
            raise BrokerError(msg) from exc
        counts = {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}
        for name, (partitions, _config) in topics.items():
            if name in counts and counts[name] != partitions:
                msg = f"topic {name} has {counts[name]} partitions, the worker needs {partitions}"
                raise BrokerError(msg)
        missing = [name for name in topics if name not in counts]
        if not missing:
            return
        replication = min(3, max(1, len(md.brokers)))
        _create_topics(
            admin, [NewTopic(n, topics[n][0], replication, config=topics[n][1]) for n in missing], bootstrap
        )
        if time.monotonic() > deadline:
            msg = f"topics {', '.join(missing)} are still not in the cluster metadata after {timeout:.0f} s"
            raise BrokerError(msg)
        time.sleep(0.2)


def _create_topics(admin: AdminClient, new: list[NewTopic], bootstrap: str) -> list[str]:
    """Create topics and return the names created; one that already exists (created concurrently) is
    fine."""
    created = []
    for name, future in admin.create_topics(new, operation_timeout=30, request_timeout=45).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            msg = f"cannot create topic {name} on {bootstrap}: {err.str() if err else exc}"
            raise BrokerError(msg) from exc
    return created
