"""sinks/query.py without a ledger: what travels to the process holding the embedded ledger."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from sinks.query import decode_parameters, encode_parameters


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
