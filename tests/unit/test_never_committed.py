"""Which input partitions go back to their log start after a seek (stream/recovery.py part 5)."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from pipeline.stream.recovery import never_committed


class TP(NamedTuple):
    topic: str
    partition: int


CALLS = [TP("p.calls", n) for n in range(3)]
LEADER = TP("callmeter-p-__assignor-__leader", 0)
CHANGELOG = TP("callmeter-p-seen-changelog", 1)


@pytest.mark.parametrize(
    ("committed", "expected"),
    [
        ({}, CALLS),  # a fresh cluster: every input partition
        ({CALLS[0]: 12}, CALLS[1:]),  # a commit on one: the others
        ({CALLS[0]: 0, CALLS[1]: None, CALLS[2]: 5}, CALLS[:2]),  # 0 and None are no commit to aiokafka
        ({tp: 1 for tp in CALLS}, []),
    ],
)
def test_never_committed_inputs_only(committed: dict[TP, int | None], expected: list[TP]) -> None:
    assigned = [CALLS[2], LEADER, CHANGELOG, CALLS[0], CALLS[1]]
    assert never_committed(assigned, committed, "callmeter-p-") == expected
