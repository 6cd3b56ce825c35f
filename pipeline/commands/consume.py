"""`callmeter consume TOPIC`: what is on one of the pipeline's topics, decoded, one JSON object a line
(as `kcat -C -e` or kafka-console-consumer would show it, but Avro decoded with the project's serde).

- Without ``--follow`` it prints every record now on the topic, from the beginning, and exits at the
  partitions' ends (like ``kcat -e``); a summary line goes to stderr, so an empty topic is said, never
  silent. ``--follow`` keeps printing new records until interrupted and, like kafka-console-consumer,
  starts at the end unless ``--from-beginning``.
- It reads ``read_committed`` (what the worker and the ledger sink see: aborted transactions never show)
  and joins no consumer group: partitions are assigned, nothing is committed, no offset of anybody
  moves.
- Each line: ``topic``, ``partition``, ``offset``, ``timestamp`` (RFC 3339 UTC), ``key`` and either
  ``record`` (the Avro record name) and ``value``, or ``error`` with the bytes in ``value_base64``.
  Timestamps in records are RFC 3339, decimals strings, bytes ``{"utf8": ...}`` when they are UTF-8
  text, else ``{"base64": ...}``; a dead letter's original value is also shown decoded when it can be.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from pipeline.errors import BrokerError, UsageError
from pipeline.settings import Settings
from schemas.errors import SerdeError
from schemas.serde import Serde

# The short names `consume` accepts (the topic prefix is added), with what is on each.
TOPICS = {
    "calls": "CallRecord inputs from the gateways",
    "provisioning": "ProvisioningEvent inputs",
    "calls.rated": "RatedCall: each call as the stream rated it",
    "provisioning.accepted": "ProvisioningEvent the stream accepted",
    "alerts": "Alert: usage thresholds, projected overage, quota",
    "deadletter": "DeadLetter: bad input with its reason and original bytes",
    "duplicates": "Duplicate: copies the stream dropped",
}


# Without --follow, how long the broker may stay silent before the partitions' ends are reached.
_SILENCE_SECONDS = 30.0


def topic_name(settings: Settings, name: str) -> str:
    """The full topic of a short name (or of a full name of this pipeline); UsageError otherwise."""
    short = (
        name[len(settings.topic_prefix) :]
        if settings.topic_prefix and name.startswith(settings.topic_prefix)
        else name
    )
    if short not in TOPICS:
        msg = f"consume: unknown topic {name!r}; one of: {', '.join(TOPICS)}"
        raise UsageError(msg)
    return settings.topic(short)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        try:
            return {"utf8": value.decode("utf-8")}
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _key(key: bytes | None) -> Any:
    """Keys are tenant ids (UTF-8 text) on every topic of the pipeline; anything else is shown as bytes."""
    if key is None:
        return None
    shown = _plain(key)
    return shown.get("utf8", shown)


def render(
    serde: Serde,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    key: bytes | None,
    value: bytes | None,
) -> dict[str, Any]:
    """One record as the JSON object `consume` prints."""
    line: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp": _plain(datetime.fromtimestamp(timestamp_ms / 1000, UTC)),
        "key": _key(key),
    }
    try:
        name, record = serde.decode(value or b"")
    except SerdeError as exc:
        line["error"] = f"{exc.reason}: {exc.message}"
        line["value_base64"] = base64.b64encode(value or b"").decode("ascii")
        return line
    line["record"] = name
    line["value"] = _plain(record)
    original = record.get("value") if name == "DeadLetter" else None
    if isinstance(original, bytes):
        try:
            inner_name, inner = serde.decode(original)
        except SerdeError:
            pass  # undecodable input is why many dead letters exist; the bytes are shown above
        else:
            line["original_decoded"] = {"record": inner_name, "value": _plain(inner)}
    return line


def consume(settings: Settings, bootstrap: str, serde: Serde, args: argparse.Namespace) -> int:
    topic = topic_name(settings, args.topic)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "callmeter-consume",  # required by the client; never joined (assign) nor committed
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "log_level": 0,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            msg = f"consume: topic {topic} does not exist on {bootstrap} (has the pipeline run here?)"
            raise BrokerError(msg)
        start = OFFSET_END if args.follow and not args.from_beginning else OFFSET_BEGINNING
        consumer.assign([TopicPartition(topic, p, start) for p in sorted(meta.partitions)])
        printed = _print_records(consumer, serde, set(meta.partitions), args.max, args.follow)
    except KafkaException as exc:
        msg = f"consume {topic}: {exc}"
        raise BrokerError(msg) from exc
    finally:
        consumer.close()
    if not args.follow:
        where = f"{topic} ({len(meta.partitions)} partitions, committed records)"
        print(f"callmeter: {printed} record{'s' if printed != 1 else ''} from {where}", file=sys.stderr)
    return 0


def _print_records(
    consumer: Consumer, serde: Serde, partitions: set[int], limit: int | None, follow: bool
) -> int:
    printed = 0
    at_end: set[int] = set()
    heard = time.monotonic()
    while limit is None or printed < limit:
        if not follow and at_end >= partitions:
            break
        msg = consumer.poll(0.5)
        if msg is None:
            if not follow and time.monotonic() - heard > _SILENCE_SECONDS:
                text = f"no answer from the broker for {_SILENCE_SECONDS:.0f} s"
                raise BrokerError(text)
            continue
        heard = time.monotonic()
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                at_end.add(int(msg.partition() or 0))
                continue
            raise KafkaException(err)
        at_end.discard(int(msg.partition() or 0))
        line = render(
            serde,
            str(msg.topic()),
            int(msg.partition() or 0),
            int(msg.offset() or 0),
            msg.timestamp()[1],
            msg.key(),
            msg.value(),
        )
        sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
        if follow:
            sys.stdout.flush()
        printed += 1
    sys.stdout.flush()
    return printed
