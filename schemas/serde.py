"""Avro encoding and decoding of callmeter's Kafka values.

Two wire formats, both decodable by every :class:`Serde` whatever it is configured to write:

* Avro single-object encoding (no registry): ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint
  of the writer schema's parsing canonical form + Avro binary body. Writer schemas are the
  ``*.v<N>.avsc`` files next to this module.
* Confluent wire format (registry configured): ``00`` + 4-byte big-endian schema id + Avro binary body.

Decoding always resolves the writer schema to the newest local version of the same record, so consumers
see one shape per record name no matter which producer version wrote the bytes.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

# The registry client pulls in httpx, authlib and joserfc (~0.27 s of imports): imported where a
# registry is configured, so commands that only read single-object values (replay) start faster.
if TYPE_CHECKING:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer

from schemas.errors import INVALID_EVENT, UNDECODABLE, UNKNOWN_SCHEMA, RegistryError, SerdeError

SCHEMA_DIR = Path(__file__).resolve().parent
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0
_SINGLE_OBJECT_HEADER_LEN = 10
_CONFLUENT_HEADER_LEN = 5
_SCHEMA_FILE = re.compile(r"^(?P<stem>[a-z][a-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc$")
_MAX_MESSAGE = 300

# Errors fastavro's writer raises for a record that does not fit the schema.
_ENCODE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, OverflowError)


@dataclass(frozen=True)
class SchemaVersion:
    """One known writer schema."""

    record_name: str
    """Short record name, e.g. ``CallRecord``."""
    version: int
    """The ``v<N>`` of its file; registered schemas get one more than the newest known."""
    fingerprint: bytes
    """CRC-64-AVRO, 8 bytes little-endian, exactly as single-object encoding carries it."""
    raw: dict[str, Any]
    parsed: dict[str, Any]


@dataclass(frozen=True)
class _Codec:
    record_name: str
    writer: dict[str, Any]
    # None when writer and reader are the same schema: fastavro then skips resolution, the fast path.
    reader: dict[str, Any] | None


def fingerprint(schema: Any) -> bytes:
    """CRC-64-AVRO fingerprint of ``schema``'s parsing canonical form, as 8 little-endian bytes."""
    # fastavro renders the 64-bit value's little-endian bytes as hex, the byte order the Avro spec
    # prescribes for the single-object header (checked against the spec's algorithm in the tests).
    return bytes.fromhex(_fastavro_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def fingerprint_hex(fp: bytes) -> str:
    """The fingerprint as the 64-bit number the Avro spec's reference code computes, for messages."""
    return f"0x{int.from_bytes(fp, 'little'):016x}"


def _short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _make_version(raw: dict[str, Any], version: int) -> SchemaVersion:
    parsed = parse_schema(raw)
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        msg = "top-level schema must be a record"
        raise ValueError(msg)
    return SchemaVersion(
        record_name=_short_name(parsed["name"]),
        version=version,
        fingerprint=fingerprint(raw),
        raw=raw,
        parsed=parsed,
    )


def load_schemas(directory: Path = SCHEMA_DIR) -> list[SchemaVersion]:
    """Every ``<snake_name>.v<N>.avsc`` in ``directory``, oldest version first per record."""
    versions: list[SchemaVersion] = []
    seen: set[tuple[str, int]] = set()
    for path in sorted(directory.glob("*.avsc")):
        match = _SCHEMA_FILE.match(path.name)
        if match is None:
            msg = f"{path.name}: schema files must be named <snake_name>.v<N>.avsc"
            raise ValueError(msg)
        version = _make_version(json.loads(path.read_text(encoding="utf-8")), int(match["version"]))
        # The file name is how people find a record's history; a mismatch would hide a version.
        if _snake(version.record_name) != match["stem"]:
            expected = _snake(version.record_name)
            msg = f"{path.name} holds record {version.record_name}; name the file {expected}.v<N>.avsc"
            raise ValueError(msg)
        if (version.record_name, version.version) in seen:
            msg = f"{path.name}: version {version.version} of {version.record_name} defined twice"
            raise ValueError(msg)
        seen.add((version.record_name, version.version))
        versions.append(version)
    return sorted(versions, key=lambda v: (v.record_name, v.version))


ALL_VERSIONS: list[SchemaVersion] = load_schemas()
WRITER_SCHEMAS: dict[bytes, SchemaVersion] = {v.fingerprint: v for v in ALL_VERSIONS}
"""Every known writer schema by fingerprint."""
_NEWEST: dict[str, SchemaVersion] = {v.record_name: v for v in ALL_VERSIONS}  # sorted: last wins
RECORDS: dict[str, dict[str, Any]] = {name: v.parsed for name, v in _NEWEST.items()}
"""Record name -> newest parsed schema: what ``decode`` returns and ``encode`` writes."""


class Serde:
    """Encode and decode callmeter records; one instance per process is enough (all lookups are cached).

    ``registry_basic_auth`` is ``"user:password"``, passed as the registry client's
    ``basic.auth.user.info``.
    """

    def __init__(self, registry_url: str | None = None, registry_basic_auth: str | None = None) -> None:
        self._newest: dict[str, SchemaVersion] = dict(_NEWEST)
        self._versions: dict[bytes, SchemaVersion] = dict(WRITER_SCHEMAS)
        self._by_fingerprint: dict[bytes, _Codec] = {}
        self._by_schema_id: dict[int, _Codec] = {}
        self._headers: dict[str, bytes] = {}
        self._serializers: dict[str, AvroSerializer] = {}
        self._registry: SchemaRegistryClient | None = None
        if registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            conf = {"url": registry_url}
            if registry_basic_auth:
                conf["basic.auth.user.info"] = registry_basic_auth
            self._registry = SchemaRegistryClient(conf)
        self._rebuild()

    @property
    def uses_registry(self) -> bool:
        return self._registry is not None

    def _rebuild(self) -> None:
        self._headers = {name: SINGLE_OBJECT_MAGIC + v.fingerprint for name, v in self._newest.items()}
        self._by_fingerprint = {fp: self._codec(v.parsed, fp) for fp, v in self._versions.items()}
        self._by_schema_id.clear()
        self._serializers.clear()

    def _codec(self, writer: dict[str, Any], writer_fp: bytes) -> _Codec:
        name = _short_name(writer["name"])
        newest = self._newest[name]
        reader = None if newest.fingerprint == writer_fp else newest.parsed
        return _Codec(record_name=name, writer=writer, reader=reader)

    def current_version(self, record_name: str) -> SchemaVersion:
        """The schema ``encode`` writes and ``decode`` resolves to for ``record_name``."""
        try:
            return self._newest[record_name]
        except KeyError:
            msg = f"no schema for record {record_name!r}"
            raise SerdeError(UNKNOWN_SCHEMA, msg) from None

    def register_writer_schema(self, schema: dict[str, Any]) -> bytes:
        """Accept bytes written with ``schema`` (e.g. by a newer producer); returns its fingerprint.

        Decoding still resolves to the current version of that record, so the consumer sees its own
        shape: fields it does not know are dropped, fields the writer lacks get their defaults.
        """
        version = _make_version(schema, 0)
        current = self.current_version(version.record_name)
        version = SchemaVersion(
            version.record_name, current.version + 1, version.fingerprint, version.raw, version.parsed
        )
        self._versions.setdefault(version.fingerprint, version)
        self._by_fingerprint[version.fingerprint] = self._codec(version.parsed, version.fingerprint)
        return version.fingerprint

    def add_schema_version(self, schema: dict[str, Any]) -> bytes:
        """Make ``schema`` the newest version of its record, as a new ``.v<N+1>.avsc`` file would.

        ``encode`` writes it from now on and ``decode`` resolves every older writer to it. Returns its
        fingerprint.
        """
        fp = self.register_writer_schema(schema)
        version = self._versions[fp]
        self._newest[version.record_name] = version
        self._rebuild()
        return fp

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, record_name: str, record: dict[str, Any], topic: str) -> bytes:
        """Encode ``record`` with the newest ``record_name`` schema.

        Single-object encoding without a registry; Confluent framing, registering the schema under
        subject ``<topic>-value``, with one. Datetimes must be timezone-aware. A record that does not
        fit the schema raises ``SerdeError("INVALID_EVENT")``; a registry failure ``RegistryError``.
        """
        if self._registry is not None:
            return self._encode_confluent(record_name, record, topic)
        header = self._headers.get(record_name)
        if header is None:
            msg = f"no schema for record {record_name!r}"
            raise SerdeError(UNKNOWN_SCHEMA, msg)
        buf = io.BytesIO()
        buf.write(header)
        try:
            # strict_allow_default: a misspelt key is an error instead of silently dropped, while
            # nullable fields may be left out.
            schemaless_writer(buf, self._newest[record_name].parsed, record, strict_allow_default=True)
        except _ENCODE_ERRORS as exc:
            msg = f"{record_name} cannot be encoded: {_one_line(exc)}"
            raise SerdeError(INVALID_EVENT, msg) from exc
        return buf.getvalue()

    def _encode_confluent(self, record_name: str, record: dict[str, Any], topic: str) -> bytes:
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.schema_registry.error import SchemaRegistryError
        from confluent_kafka.serialization import MessageField, SerializationContext

        assert self._registry is not None
        version = self.current_version(record_name)
        serializer = self._serializers.get(record_name)
        if serializer is None:
            serializer = AvroSerializer(
                self._registry, json.dumps(version.raw), conf={"auto.register.schemas": True}
            )
            self._serializers[record_name] = serializer
        # The Confluent serializer is lenient about unknown keys; keep both formats equally strict.
        extra = record.keys() - {f["name"] for f in version.parsed["fields"]}
        if extra:
            msg = f"{record_name} cannot be encoded: unknown fields {sorted(extra)}"
            raise SerdeError(INVALID_EVENT, msg)
        try:
            data = serializer(record, SerializationContext(topic, MessageField.VALUE))
        except SchemaRegistryError as exc:
            msg = f"schema registry refused {record_name} for {topic}-value: {_one_line(exc)}"
            raise RegistryError(msg) from exc
        except _ENCODE_ERRORS as exc:
            msg = f"{record_name} cannot be encoded: {_one_line(exc)}"
            raise SerdeError(INVALID_EVENT, msg) from exc
        except Exception as exc:  # transport errors come from httpx, whose types we do not import
            msg = f"schema registry unavailable: {_one_line(exc)}"
            raise RegistryError(msg) from exc
        assert data is not None
        return data

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """Decode a value in either wire format into ``(record_name, record)``.

        The record has the newest local schema's fields. Raises ``SerdeError`` with reason
        UNDECODABLE (bad framing, truncated or corrupt body) or UNKNOWN_SCHEMA (fingerprint or schema
        id not known, Confluent framing without a registry, incompatible writer), and
        ``RegistryError`` when the registry cannot be asked.
        """
        if not data:
            msg = "empty value"
            raise SerdeError(UNDECODABLE, msg)
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < _SINGLE_OBJECT_HEADER_LEN:
                msg = f"single-object header truncated ({len(data)} bytes)"
                raise SerdeError(UNDECODABLE, msg)
            fp = bytes(data[2:_SINGLE_OBJECT_HEADER_LEN])
            codec = self._by_fingerprint.get(fp)
            if codec is None:
                msg = f"no known writer schema has fingerprint {fingerprint_hex(fp)}"
                raise SerdeError(UNKNOWN_SCHEMA, msg)
            return codec.record_name, _read(codec, data, _SINGLE_OBJECT_HEADER_LEN)
        if data[0] == CONFLUENT_MAGIC:
            if len(data) < _CONFLUENT_HEADER_LEN:
                msg = f"Confluent header truncated ({len(data)} bytes)"
                raise SerdeError(UNDECODABLE, msg)
            codec = self._codec_for_schema_id(int.from_bytes(data[1:_CONFLUENT_HEADER_LEN], "big"))
            return codec.record_name, _read(codec, data, _CONFLUENT_HEADER_LEN)
        msg = f"unknown framing: starts with {bytes(data[:2]).hex()}, expected c301 (Avro) or 00 (Confluent)"
        raise SerdeError(UNDECODABLE, msg)

    def decode_many(self, items: list[bytes]) -> list[tuple[str, dict[str, Any]] | SerdeError]:
        """``decode`` each item; a bad item yields its ``SerdeError`` in place instead of raising."""
        out: list[tuple[str, dict[str, Any]] | SerdeError] = []
        for data in items:
            try:
                out.append(self.decode(data))
            except SerdeError as exc:
                out.append(exc)
        return out

    def _codec_for_schema_id(self, schema_id: int) -> _Codec:
        codec = self._by_schema_id.get(schema_id)
        if codec is not None:
            return codec
        if self._registry is None:
            msg = f"Confluent-framed value with schema id {schema_id}, but no schema registry is configured"
            raise SerdeError(UNKNOWN_SCHEMA, msg)
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            schema = self._registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                msg = f"schema id {schema_id} is not in the registry"
                raise SerdeError(UNKNOWN_SCHEMA, msg) from exc
            msg = f"schema registry failed for schema id {schema_id}: {_one_line(exc)}"
            raise RegistryError(msg) from exc
        except Exception as exc:  # transport errors come from httpx, whose types we do not import
            msg = f"schema registry unavailable: {_one_line(exc)}"
            raise RegistryError(msg) from exc
        codec = self._codec_from_registry(schema_id, schema)
        self._by_schema_id[schema_id] = codec
        return codec

    def _codec_from_registry(self, schema_id: int, schema: Schema) -> _Codec:
        if schema.schema_type not in (None, "AVRO"):
            msg = f"schema id {schema_id} is {schema.schema_type}, not Avro"
            raise SerdeError(UNKNOWN_SCHEMA, msg)
        try:
            raw = json.loads(schema.schema_str or "")
            version = _make_version(raw, 0)
        except Exception as exc:  # any parse failure means we cannot use this writer schema
            msg = f"schema id {schema_id} is not a usable Avro record schema: {_one_line(exc)}"
            raise SerdeError(UNKNOWN_SCHEMA, msg) from exc
        if version.record_name not in self._newest:
            msg = f"schema id {schema_id} is record {version.record_name}, which callmeter does not read"
            raise SerdeError(UNKNOWN_SCHEMA, msg)
        return self._codec(version.parsed, version.fingerprint)


def _read(codec: _Codec, data: bytes, offset: int) -> dict[str, Any]:
    buf = io.BytesIO(data)
    buf.seek(offset)
    try:
        record = schemaless_reader(buf, codec.writer, codec.reader)
    except SchemaResolutionError as exc:
        msg = f"writer schema of {codec.record_name} cannot be read as the current one: {_one_line(exc)}"
        raise SerdeError(UNKNOWN_SCHEMA, msg) from exc
    except Exception as exc:  # corrupt bytes surface as EOFError, IndexError, UnicodeDecodeError, ...
        msg = f"{codec.record_name} body does not decode: {_one_line(exc)}"
        raise SerdeError(UNDECODABLE, msg) from exc
    # Leftover bytes mean the body was not written with this schema, even if a prefix happened to parse.
    left = len(data) - buf.tell()
    if left:
        msg = f"{left} trailing bytes after the {codec.record_name} body"
        raise SerdeError(UNDECODABLE, msg)
    return record  # type: ignore[return-value]  # a record schema always yields a dict
