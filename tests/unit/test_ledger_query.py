"""pipeline/ledgerquery/sql.py and `callmeter sql` output without a ledger: what travels to the
process holding the embedded ledger, the limits as ClickHouse settings, refusals as one line,
rows as they come."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from pipeline.commands.sql_output import write_result
from sinks.readonly import (
    QueryLimitError,
    QueryLimits,
    QueryStream,
    decode_parameters,
    encode_parameters,
    refusal,
)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 11, 1, 12, 30, 0, 125000, tzinfo=UTC),
        date(2026, 11, 1),
        Decimal("803.43"),
        "tenant-0001",
        42,
        None,
        ["a", datetime(2026, 10, 1, tzinfo=UTC)],
        {"$note": "a one-key dict with an unknown tag stays as it is"},
    ],
)
def test_query_parameters_cross_json_as_the_values_passed(value: object) -> None:
    wire = json.loads(json.dumps(encode_parameters({"p": value})))
    assert decode_parameters(wire) == {"p": value}
    assert type(decode_parameters(wire)["p"]) is type(value)


def test_limits_become_settings_with_readonly_last() -> None:
    settings = QueryLimits(max_rows=10_000, max_seconds=60, max_memory_mb=1024).settings()
    assert settings == {
        "max_execution_time": 60,
        "max_memory_usage": 1024 * 1024 * 1024,
        "max_result_rows": 10_001,
        "result_overflow_mode": "break",
        "readonly": 1,
    }
    assert list(settings)[-1] == "readonly"  # after it, nothing can change a setting
    assert "max_result_rows" not in QueryLimits(max_rows=0).settings()


class _ClickHouseError(Exception):
    def __init__(self, text: str, code: int) -> None:
        super().__init__(text)
        self.code = code


@pytest.mark.parametrize(
    ("text", "code", "expected"),
    [
        (
            "Code: 159. DB::Exception: Timeout exceeded: elapsed 2004.4 ms, maximum: 2000.000 ms. "
            "(TIMEOUT_EXCEEDED)",
            159,
            "the query ran past its time limit of 2 s",
        ),
        (
            "Code: 241. DB::Exception: Query memory limit exceeded: would use 24.00 MiB. "
            "(MEMORY_LIMIT_EXCEEDED)",
            241,
            "the query needed more than its 20 MB of memory",
        ),
        (
            "Code: 164. DB::Exception: default: Cannot execute query in readonly mode. (READONLY)",
            164,
            "refused: the ledger is read-only here (SELECT, SHOW, DESCRIBE, EXPLAIN and WITH only)",
        ),
        (
            "Code: 164. DB::Exception: Code: 164. DB::Exception: Cannot modify 'max_threads' setting in "
            "readonly mode. (READONLY) (version 26.9.2.1). (READONLY)",
            164,
            "refused: a query cannot change settings here",
        ),
        (
            "Code: 62. DB::Exception: Syntax error: failed at position 10 (end of query): (1. Unmatched "
            "parentheses: '(' at position 8 is never closed: In scope SELECT formatQuery('SELECT (1'). "
            "(SYNTAX_ERROR)",
            62,
            "query failed: Syntax error: failed at position 10 (end of query): (1. Unmatched parentheses: "
            "'(' at position 8 is never closed",
        ),
        (
            "Code: 47. DB::Exception: Unknown expression identifier `nope` in scope SELECT nope FROM t "
            "FORMAT Native. (UNKNOWN_IDENTIFIER) (version 26.9.2.1)",
            47,
            "query failed: Unknown expression identifier `nope` in scope SELECT nope FROM t. "
            "(UNKNOWN_IDENTIFIER)",
        ),
    ],
)
def test_a_refusal_is_one_line_about_the_query_written(text: str, code: int, expected: str) -> None:
    error = refusal(_ClickHouseError(text, code), QueryLimits(max_seconds=2, max_memory_mb=20))
    assert str(error) == expected
    assert isinstance(error, QueryLimitError) == (code in (159, 241))


def test_rows_past_the_limit_are_not_shown_but_flagged() -> None:
    stream = QueryStream(["n"], iter([[i] for i in range(5)]), max_rows=3)
    assert list(stream.rows) == [[0], [1], [2]] and stream.truncated
    exact = QueryStream(["n"], iter([[i] for i in range(3)]), max_rows=3)
    assert list(exact.rows) == [[0], [1], [2]] and not exact.truncated
    unlimited = QueryStream(["n"], iter([[i] for i in range(5)]), max_rows=0)
    assert len(list(unlimited.rows)) == 5 and not unlimited.truncated


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("json", '[\n{"tenant": "acme", "total": "75.69"},\n{"tenant": "bolt", "total": null}\n]\n'),
        ("csv", "tenant,total\nacme,75.69\nbolt,\n"),
        ("table", "tenant  total\n------  -----\nacme    75.69\nbolt    NULL\n(2 rows)\n"),
    ],
)
def test_results_are_written_row_by_row_in_each_format(fmt: str, expected: str) -> None:
    out = io.StringIO()
    stream = QueryStream(["tenant", "total"], iter([["acme", "75.69"], ["bolt", None]]))
    assert write_result(stream, fmt, out) == 2
    assert out.getvalue() == expected


def test_an_empty_result_and_a_cut_table() -> None:
    out = io.StringIO()
    write_result(QueryStream(["n"], iter([])), "json", out)
    assert json.loads(out.getvalue()) == []
    out = io.StringIO()
    write_result(QueryStream(["n"], iter([[1], [2], [3]]), max_rows=2), "table", out)
    assert out.getvalue() == "n\n-\n1\n2\n(2 rows, more not shown)\n"
