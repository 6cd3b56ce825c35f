"""Read-only queries on the ledger's engine, each in a session of its own, and the wire format in which
the process holding an embedded ledger answers them (sinks/sql_server.py serves it; the client side is
pipeline/ledgerquery/sql.py).

Every query runs in a ClickHouse session of its own, never the sink's: with the embedded engine a
fresh connection handle whose session is set to the query's limits and then ``readonly = 1`` (nothing
can change a setting after that, so the limits hold); with a server, per-query settings, which no
later query sees. A refused statement or a query's settings therefore never reach the session the sink
inserts through (they once did: a refused DROP left the shared session read-only and every insert
failed). Read-only is ClickHouse's own setting, not a check of the text; the text is checked only to
explain a refusal well and to refuse what read-only does not stop (``INTO OUTFILE`` writes a file).

Limits (``QueryLimits``) are the ones clickhouse-client's read-only profiles use: rows returned (the
engine stops producing soon after), execution time and memory; rows are streamed as the engine produces
them, never built up whole. The statement is first parsed alone (``formatQuery``), so a syntax error
quotes the analyst's text and nothing the driver appends to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from sinks.connect import connect
from sinks.errors import LedgerError

Result = tuple[list[str], list[list[Any]]]
Limit = Literal["rows", "seconds", "memory"]


@dataclass(frozen=True)
class QueryLimits:
    """What one query may take. ``max_rows`` 0 is no row limit."""

    max_rows: int = 0
    max_seconds: float = 60.0
    max_memory_mb: int = 1024

    def settings(self) -> dict[str, Any]:
        """ClickHouse settings, ``readonly`` last: once it applies no setting can change."""
        out: dict[str, Any] = {
            "max_execution_time": self.max_seconds,
            "max_memory_usage": self.max_memory_mb * 1024 * 1024,
        }
        if self.max_rows:
            # One more than shown, to tell "exactly max_rows" from "more"; 'break' ends the query there
            # (at a block's end) instead of failing it.
            out.update(max_result_rows=self.max_rows + 1, result_overflow_mode="break")
        out["readonly"] = 1
        return out


class QueryLimitError(LedgerError):
    """ClickHouse stopped the query at one of its limits (``limit``: seconds or memory)."""

    def __init__(self, message: str, limit: Limit) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass
class QueryStream:
    """A query's column names and its rows (JSON-ready values) as they come, at most ``max_rows``;
    ``truncated`` turns True once the rows are read if there were more."""

    columns: list[str]
    source: Iterator[list[Any]]
    max_rows: int = 0
    truncated: bool = field(default=False, init=False)

    @property
    def rows(self) -> Iterator[list[Any]]:
        for n, row in enumerate(self.source):
            if self.max_rows and n == self.max_rows:
                self.truncated = True
                return
            yield row


# -- running a query in this process -----------------------------------------------------------------
_STREAMED = ("SELECT", "WITH")
_ANSWERED_WHOLE = ("SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")
_REFUSED = "refused: the ledger is read-only here (SELECT, SHOW, DESCRIBE, EXPLAIN and WITH only)"


@contextmanager
def local_query(
    dsn: str, password: str | None, sql: str, limits: QueryLimits, parameters: dict[str, Any] | None
) -> Iterator[QueryStream]:
    """The query on a client and session of its own, opened here and closed after."""
    embedded = dsn.startswith("chdb:")
    # Embedded: the session carries the limits and read-only. Server: each request carries them.
    client = connect(dsn, password, settings=limits.settings() if embedded else None)
    per_query = None if embedded else limits.settings()
    try:
        statement = sql.strip().rstrip(";").strip()
        verb = _checked(client, statement, per_query, limits)
        if verb in _STREAMED:
            context = _driver(
                limits,
                lambda: client.query_row_block_stream(statement, parameters=parameters, settings=per_query),
            )
            with context:
                columns = list(context.source.column_names)
                rows = (row for block in _guarded(limits, context) for row in block)
                yield QueryStream(columns, (_row(r) for r in rows), limits.max_rows)
        else:
            # chdb streams SELECTs only; these answers are small.
            result = _driver(
                limits, lambda: client.query(statement, parameters=parameters, settings=per_query)
            )
            yield QueryStream(
                list(result.column_names), (_row(r) for r in result.result_rows), limits.max_rows
            )
    finally:
        client.close()


def _checked(client: Any, statement: str, settings: dict[str, Any] | None, limits: QueryLimits) -> str:
    """The statement's verb, once it parses alone and is one this path runs; else a LedgerError."""
    if not statement:
        msg = "the query is empty"
        raise LedgerError(msg)
    parse = "SELECT formatQuery({q:String})"
    formatted = str(
        _driver(
            limits, lambda: client.query(parse, parameters={"q": statement}, settings=settings)
        ).result_rows[0][0]
    )
    verb = formatted.split(None, 1)[0].upper() if formatted.strip() else ""
    if verb not in _STREAMED + _ANSWERED_WHOLE:
        raise LedgerError(_REFUSED)
    if re.search(r"^INTO\s+OUTFILE\b", formatted, flags=re.MULTILINE | re.IGNORECASE):
        msg = "refused: INTO OUTFILE would write a file on the ledger's host; redirect the output instead"
        raise LedgerError(msg)
    if re.search(r"^FORMAT\s+\w+\s*$", formatted, flags=re.MULTILINE | re.IGNORECASE):
        msg = "a FORMAT clause is not taken here: choose the output with --format (table, csv or json)"
        raise LedgerError(msg)
    return verb


def _driver(limits: QueryLimits, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except LedgerError:
        raise
    except Exception as exc:  # the driver raises many kinds; the caller needs one line
        raise refusal(exc, limits) from exc


def _guarded(limits: QueryLimits, blocks: Iterator[Any]) -> Iterator[Any]:
    """Blocks as the engine produces them; an error mid-stream (a limit reached) as a LedgerError."""
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            return
        except Exception as exc:
            raise refusal(exc, limits) from exc
        yield block


def refusal(exc: BaseException, limits: QueryLimits) -> LedgerError:
    """One line about the analyst's query: what ClickHouse refused or where it stopped it."""
    text = " ".join(str(exc).split())
    code = getattr(exc, "code", None)
    if code == 159 or "(TIMEOUT_EXCEEDED)" in text:
        return QueryLimitError(f"the query ran past its time limit of {limits.max_seconds:g} s", "seconds")
    if code == 241 or "(MEMORY_LIMIT_EXCEEDED)" in text:
        return QueryLimitError(
            f"the query needed more than its {limits.max_memory_mb} MB of memory", "memory"
        )
    if "setting in readonly mode" in text:
        return LedgerError("refused: a query cannot change settings here")
    if code == 164 or "(READONLY)" in text:
        return LedgerError(_REFUSED)
    # ClickHouse repeats "Code: n. DB::Exception:" prefixes; keep the message, not the parse check
    # around it ("In scope SELECT formatQuery(...)") nor the driver's "FORMAT Native".
    message = text.split("DB::Exception:")[-1].strip() if "DB::Exception:" in text else text
    message = re.split(r":? In scope SELECT formatQuery\(", message)[0]
    message = re.sub(r"\s*\(version [\d.]+\)", "", message.replace(" FORMAT Native", "")).strip()
    if len(message) > 300:  # "Expected one of:" lists every token the parser knows
        message = message[: message.rfind(", ", 0, 300)] + ", ..."
    return LedgerError(f"query failed: {message}")


def _row(row: Any) -> list[Any]:
    return [_plain(v) for v in row]


def _plain(value: Any) -> Any:
    """A JSON-ready value: money stays exact (Decimal as its string), times in ISO 8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        # Every time in the ledger is UTC; the embedded engine hands some back without a zone.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # UUID, IP addresses and the like, as ClickHouse prints them


# -- asking the process that holds the embedded ledger --------------------------------------------------
# Query parameters travel to the process holding the ledger as JSON; the types JSON lacks are tagged so
# that they reach the server-side binding as the values the caller passed (a datetime stays a datetime).
_TAGS: dict[str, Callable[[str], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "decimal": Decimal,
}


def encode_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    def encode(value: Any) -> Any:
        if isinstance(value, datetime):
            return {"$datetime": value.isoformat()}
        if isinstance(value, date):
            return {"$date": value.isoformat()}
        if isinstance(value, Decimal):
            return {"$decimal": str(value)}
        if isinstance(value, list | tuple):
            return [encode(v) for v in value]
        return value

    return {name: encode(value) for name, value in parameters.items()}


def decode_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    def decode(value: Any) -> Any:
        if isinstance(value, dict) and len(value) == 1:
            ((tag, text),) = value.items()
            if tag.startswith("$") and tag[1:] in _TAGS:
                return _TAGS[tag[1:]](text)
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return {name: decode(value) for name, value in parameters.items()}


def limits_to_json(limits: QueryLimits) -> dict[str, Any]:
    return asdict(limits)


def limits_from_json(body: dict[str, Any]) -> QueryLimits:
    return QueryLimits(
        max_rows=max(int(body["max_rows"]), 0),
        max_seconds=float(body["max_seconds"]),
        max_memory_mb=int(body["max_memory_mb"]),
    )


def error_from_json(body: dict[str, Any]) -> LedgerError:
    limit = body.get("limit")
    if limit in ("seconds", "memory"):
        return QueryLimitError(str(body["error"]), limit)
    return LedgerError(str(body.get("error", body)))


def endpoint_file(dsn: str) -> Path | None:
    """Where the holder of an embedded ledger announces its query port; None for a server."""
    if not dsn.startswith("chdb:"):
        return None
    return Path(dsn.removeprefix("chdb://").rstrip("/") + ".query.json")
