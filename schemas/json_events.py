"""The JSON-lines form of input events (spec section 1), used by ``produce`` and the simulator.

One object per line with ``"type": "call"`` (a CallRecord) or ``"type": "provisioning"`` (a
ProvisioningEvent); the other keys are the record's fields. Timestamps are RFC 3339 strings with an
explicit offset; nullable fields are ``null`` or may be left out.

Field rules are derived from the newest Avro schemas, so a new schema version changes the accepted JSON
without touching this module (unless it introduces a field type handled nowhere below).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from schemas.errors import INVALID_EVENT, SerdeError
from schemas.serde import RECORDS

EVENT_TYPES: dict[str, str] = {"call": "CallRecord", "provisioning": "ProvisioningEvent"}
"""JSON ``type`` -> Avro record name."""
_JSON_TYPE_OF = {record: kind for kind, record in EVENT_TYPES.items()}

_RFC3339 = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt](?P<h>\d{2}):(?P<m>\d{2}):(?P<s>\d{2})"
    r"(?:\.(?P<frac>\d+))?(?P<tz>[Zz]|[+-]\d{2}:\d{2})"
)
_MAX_SHOWN = 60
_MISSING: Any = object()


@dataclass(frozen=True)
class _Field:
    name: str
    kind: str  # string | enum | timestamp | int | long | boolean | int_array
    nullable: bool
    symbols: frozenset[str] = frozenset()


def _field_of(field: dict[str, Any]) -> _Field:
    avro_type = field["type"]
    nullable = False
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        if len(branches) != 1 or len(avro_type) != 2:
            msg = f"field {field['name']}: only [null, T] unions have a JSON form"
            raise ValueError(msg)
        nullable, avro_type = True, branches[0]
    if isinstance(avro_type, dict):
        if avro_type.get("type") == "enum":
            return _Field(field["name"], "enum", nullable, frozenset(avro_type["symbols"]))
        if avro_type.get("logicalType") == "timestamp-millis":
            return _Field(field["name"], "timestamp", nullable)
        if avro_type.get("type") == "array" and avro_type.get("items") == "int":
            return _Field(field["name"], "int_array", nullable)
        avro_type = avro_type.get("type")
    if avro_type in ("string", "int", "long", "boolean"):
        return _Field(field["name"], avro_type, nullable)
    # Fail at import: a schema change must not make produce silently mangle a field.
    msg = f"field {field['name']}: Avro type {avro_type!r} has no JSON form here"
    raise ValueError(msg)


_FIELDS: dict[str, tuple[_Field, ...]] = {
    record: tuple(_field_of(f) for f in RECORDS[record]["fields"]) for record in EVENT_TYPES.values()
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _invalid(record_name: str, field: str, problem: str) -> SerdeError:
    msg = f"{record_name} field {field!r}: {problem}"
    return SerdeError(INVALID_EVENT, msg)


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp as an aware UTC datetime with millisecond precision.

    Raises ``ValueError`` for anything else, including a missing offset and digits below the
    millisecond that are not zero (Avro ``timestamp-millis`` would silently drop them).
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        msg = "not an RFC 3339 timestamp with offset, e.g. 2026-11-05T10:16:42.400Z"
        raise ValueError(msg)
    frac = match["frac"] or ""
    if frac[3:].strip("0"):
        msg = "finer than millisecond precision"
        raise ValueError(msg)
    tz_text = match["tz"]
    tz = UTC
    if tz_text not in ("Z", "z"):
        sign = -1 if tz_text[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(tz_text[1:3]), minutes=int(tz_text[4:6])))
    year, month, day = (int(p) for p in match["date"].split("-"))
    millis = int((frac + "000")[:3])
    stamp = datetime(
        year, month, day, int(match["h"]), int(match["m"]), int(match["s"]), millis * 1000, tzinfo=tz
    )
    return stamp.astimezone(UTC)


def format_timestamp(stamp: datetime) -> str:
    """RFC 3339 in UTC with exactly three fractional digits and ``Z``; sub-millisecond digits dropped."""
    if stamp.tzinfo is None or stamp.utcoffset() is None:
        msg = "naive datetime; callmeter timestamps must be timezone-aware"
        raise ValueError(msg)
    utc = stamp.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def _convert(record_name: str, field: _Field, value: Any) -> Any:
    if value is None or value is _MISSING:
        if field.nullable:
            return None
        raise _invalid(record_name, field.name, "missing" if value is _MISSING else "must not be null")
    if field.kind == "string":
        # Absence is spelt null; an empty id would collide across events (e.g. the idempotency key).
        if not isinstance(value, str) or not value:
            raise _invalid(record_name, field.name, f"expected a non-empty string, got {_shown(value)}")
        return value
    if field.kind == "enum":
        if not isinstance(value, str) or value not in field.symbols:
            expected = ", ".join(sorted(field.symbols))
            raise _invalid(record_name, field.name, f"expected one of {expected}, got {_shown(value)}")
        return value
    if field.kind == "timestamp":
        if not isinstance(value, str):
            raise _invalid(record_name, field.name, f"expected an RFC 3339 string, got {_shown(value)}")
        try:
            return parse_timestamp(value)
        except ValueError as exc:
            raise _invalid(record_name, field.name, f"{exc}: {_shown(value)}") from None
    if field.kind == "int_array":
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise _invalid(record_name, field.name, f"expected a list of integers, got {_shown(value)}")
        return value
    if field.kind == "boolean":
        if not isinstance(value, bool):
            raise _invalid(record_name, field.name, f"expected true or false, got {_shown(value)}")
        return value
    # int / long; bool is an int subclass in Python but not in JSON.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(record_name, field.name, f"expected an integer, got {_shown(value)}")
    return value


def parse_json_event(obj: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One JSON event object -> ``(record_name, record)`` ready for ``Serde.encode``.

    Timestamps become aware UTC datetimes; missing nullable fields become None. Raises
    ``SerdeError("INVALID_EVENT", ...)`` whose one-line message names the offending field.
    Only types are checked: a call that ended before it was answered is still a valid event and is
    the rating step's to dead-letter.
    """
    if not isinstance(obj, dict):
        msg = f"event must be a JSON object, got {type(obj).__name__}"
        raise SerdeError(INVALID_EVENT, msg)
    kind = obj.get("type", _MISSING)
    record_name = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if record_name is None:
        shown = "missing" if kind is _MISSING else f"got {_shown(kind)}"
        msg = f"event field 'type': expected 'call' or 'provisioning', {shown}"
        raise SerdeError(INVALID_EVENT, msg)
    fields = _FIELDS[record_name]
    # A misspelt nullable field would otherwise be read as null without a word.
    unknown = sorted(obj.keys() - {f.name for f in fields} - {"type"})
    if unknown:
        raise _invalid(record_name, unknown[0], "unknown field")
    return record_name, {f.name: _convert(record_name, f, obj.get(f.name, _MISSING)) for f in fields}


def parse_json_line(line: str) -> tuple[str, dict[str, Any]]:
    """``parse_json_event`` of one JSON-lines line; malformed JSON is INVALID_EVENT too."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        msg = f"not valid JSON: {exc}"
        raise SerdeError(INVALID_EVENT, msg) from None
    return parse_json_event(obj)


def event_to_json(record_name: str, record: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``parse_json_event``: a JSON-ready dict, ``type`` first, then schema field order.

    Timestamps are written as ``YYYY-MM-DDTHH:MM:SS.mmmZ``. Raises ``SerdeError("INVALID_EVENT")`` for
    a record type without a JSON form, a missing required field or a naive datetime.
    """
    kind = _JSON_TYPE_OF.get(record_name)
    if kind is None:
        msg = f"{record_name} has no JSON event form (only {', '.join(_JSON_TYPE_OF)})"
        raise SerdeError(INVALID_EVENT, msg)
    out: dict[str, Any] = {"type": kind}
    for field in _FIELDS[record_name]:
        value = record.get(field.name)
        if value is None:
            if not field.nullable:
                raise _invalid(record_name, field.name, "missing")
            out[field.name] = None
        elif field.kind == "timestamp":
            if not isinstance(value, datetime):
                raise _invalid(record_name, field.name, f"expected a datetime, got {_shown(value)}")
            try:
                out[field.name] = format_timestamp(value)
            except ValueError as exc:
                raise _invalid(record_name, field.name, str(exc)) from None
        else:
            out[field.name] = list(value) if field.kind == "int_array" else value
    return out
