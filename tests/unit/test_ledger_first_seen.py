"""The ledger sink's first-seen decision (sinks/entries.py ``first_seen``): the ledger has the last
word on "seen before", for accepted events and for dead letters alike."""

from __future__ import annotations

import pytest

from sinks.entries import DEAD, Entry, first_seen

CALL_X = ("calls", "t1", "x")
BAD = (DEAD, "calls", "12345")


def entry(key: tuple[str, str, str] | None, partition: int, offset: int, payload: str = "p") -> Entry:
    return Entry(key, (partition, offset), payload if key and key[0] != DEAD else "", [("t", [offset])])


@pytest.mark.parametrize(
    ("known", "batch", "duplicates"),
    [
        # Nothing known: every key's first copy is written, a second copy in the batch is a duplicate.
        ({}, [entry(CALL_X, 0, 1), entry(CALL_X, 0, 9)], [None, (0, 1, "p")]),
        # The same source record again (a redelivered batch) is written: its rows collapse.
        ({CALL_X: [(0, 1, "p")]}, [entry(CALL_X, 0, 1)], [None]),
        # Another source record under a key the ledger holds (a resend past the stream's retention, a
        # fresh cluster): a duplicate, whatever its payload.
        ({CALL_X: [(0, 1, "p")]}, [entry(CALL_X, 2, 5, "other")], [(0, 1, "p")]),
        # A dead letter's key is its original bytes: a resent bad event is one dead letter.
        ({BAD: [(1, 7, "")]}, [entry(BAD, 1, 7), entry(BAD, 1, 40)], [None, (1, 7, "")]),
        # Duplicates records themselves have no key and are always written.
        ({}, [entry(None, 0, 3), entry(None, 0, 3)], [None, None]),
    ],
)
def test_first_seen(known: dict, batch: list[Entry], duplicates: list) -> None:
    assert [first for _entry, first in first_seen(batch, known)] == duplicates


def test_first_seen_does_not_change_what_it_was_given() -> None:
    known = {CALL_X: [(0, 1, "p")]}
    first_seen([entry(CALL_X, 0, 1), entry(("calls", "t1", "y"), 0, 2)], known)
    assert known == {CALL_X: [(0, 1, "p")]}


def test_ledger_rows_are_built_by_column_name() -> None:
    """A value can never land in the wrong column: a row is a mapping and must name every column."""
    from sinks.columns import COLUMNS, ordered
    from sinks.errors import LedgerError

    values = {name: f"v-{name}" for name in COLUMNS["catalogs"]}
    assert ordered("catalogs", values) == [
        values[name] for name in ("revision", "sha256", "body", "loaded_at")
    ]
    with pytest.raises(LedgerError, match=r"missing \['body'\], unknown \['bodyy'\]"):
        ordered("catalogs", {**{k: v for k, v in values.items() if k != "body"}, "bodyy": 1})
