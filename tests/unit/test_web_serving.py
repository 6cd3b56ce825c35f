"""The worker answers tenant questions from local state only once that state is recovered and its own
(pipeline/tenantapi/worker_port.py ``LiveState.not_serving``): otherwise a confident 200 could say "no
subscription" for a tenant whose timeline is still being read back from the changelog after an unclean
restart."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from pipeline.tenantapi.worker_port import LiveState


def _meter(*, ready: bool, rebalancing: bool = False, in_recovery: bool = False, owned: int = 1) -> Any:
    event = threading.Event()
    if ready:
        event.set()
    actives = {TP("calls", owned), TP("calls-changelog", 2)}
    app = SimpleNamespace(
        rebalancing=rebalancing,
        in_recovery=in_recovery,
        assignor=SimpleNamespace(assigned_actives=lambda: actives),
    )
    return SimpleNamespace(
        app=app, ready=event, topics=SimpleNamespace(calls="calls"), partition_of=lambda tenant: 1
    )


@pytest.mark.parametrize(
    ("meter", "reason"),
    [
        (_meter(ready=True), None),
        (_meter(ready=False), "worker starting: state not recovered yet"),
        (_meter(ready=True, rebalancing=True), "worker rebalancing: state being recovered"),
        (_meter(ready=True, in_recovery=True), "worker rebalancing: state being recovered"),
        # Partition 2 is assigned only as a changelog partition: not an active input of this worker.
        (_meter(ready=True, owned=2), "partition 1 is not assigned to this worker"),
    ],
)
def test_answers_only_from_recovered_owned_state(meter: Any, reason: str | None) -> None:
    assert LiveState(meter).not_serving("acme") == reason
