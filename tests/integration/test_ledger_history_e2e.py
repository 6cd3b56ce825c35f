"""The ledger is append-only and the first-seen copy of an event wins.

The stream's dedupe state does not outlive a fresh cluster (or a key's retention), so the ledger is the
last word on "seen before": a row an invoice used is never replaced, a later copy of a key (same or
other payload) is a duplicate, and a final invoice is re-emitted from storage whatever came since.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.cli import (
    callmeter,
    delete_topics,
    ledger_query,
    read_invoices,
    worker_stats,
)
from tests.integration.eventfiles import call, prov, write_events

# A fresh-cluster fault scenario: in `make chaos`, which keeps `make test` well under
# 30 minutes.
pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def _fresh_cluster(env: dict[str, str]) -> None:
    """New Kafka cluster and new worker hosts; the same ClickHouse ledger."""
    delete_topics(env)
    shutil.rmtree(Path(env["CALLMETER_DATA_DIR"]) / "worker", ignore_errors=True)


def _invalid(event_id: str, answered: str) -> dict:
    """A call that ended before it was answered: a dead letter."""
    event = call(event_id, "hist", answered, 60)
    event["ended_at"] = event["started_at"]
    return event


def _step(env: dict[str, str], tmp_path: Path, name: str, events: list[dict]) -> dict:
    callmeter(env, "produce", str(write_events(tmp_path / f"{name}.jsonl", events)))
    return worker_stats(env)


def test_a_fresh_cluster_reusing_keys_and_offsets_changes_no_ledger_row(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    sub = prov(
        "sub", "hist", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    x = call("x", "hist", "2026-10-10T10:00:00Z", 600)
    _step(cm_env, tmp_path, "1-sub", [sub])
    _step(cm_env, tmp_path, "2-x", [x, _invalid("bad-1", "2026-10-11T10:00:00Z")])
    october = tmp_path / "oct"
    callmeter(cm_env, "invoice", "--period", "2026-10", "--finalize", "--out", str(october))
    october_text = (october / "hist-20261001.json").read_text()

    _fresh_cluster(cm_env)
    # The same subscription id with another start and plan, then a new call that lands on the same
    # output offset as x did (a batch token built from offsets alone would make ClickHouse drop it),
    # then x's id reused for another call.
    sub_again = prov(
        "sub", "hist", "2026-11-05T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="pro", tax_region="NONE"
    )
    y = call("y", "hist", "2026-11-12T10:00:00Z", 120)
    x_again = call("x", "hist", "2026-11-10T10:00:00Z", 3000)
    _step(cm_env, tmp_path, "3-sub", [sub_again])
    # bad-2 has the input offset bad-1 had: a second dead letter, not a replacement of the first.
    _step(cm_env, tmp_path, "4-y", [y, _invalid("bad-2", "2026-11-13T10:00:00Z")])
    last = _step(cm_env, tmp_path, "5-x", [x_again])
    assert last["duplicates_in_ledger"] == {"call": 1}

    rows = ledger_query(
        cm_env, "SELECT event_id, toString(started_at), billable_seconds FROM rated_calls ORDER BY event_id"
    )
    assert rows == [["x", "2026-10-10 09:59:59.000", 600], ["y", "2026-11-12 09:59:59.000", 120]]
    subs = ledger_query(
        cm_env, "SELECT toString(occurred_at), plan_id FROM provisioning_events WHERE event_id = 'sub'"
    )
    assert subs == [["2026-10-01 00:00:00.000", "starter"]]
    dead = ledger_query(cm_env, "SELECT key, source_offset FROM dead_letters FINAL ORDER BY key")
    assert [key for key, _offset in dead] == ["hist", "hist"]
    assert dead[0][1] == dead[1][1]
    raw = ledger_query(cm_env, "SELECT topic, count() FROM raw_events GROUP BY topic ORDER BY topic")
    assert raw == [["calls", 2], ["provisioning", 1]]

    # The final October invoice comes back byte for byte; November bills y only, on starter.
    again = tmp_path / "oct-again"
    callmeter(cm_env, "invoice", "--period", "2026-10", "--out", str(again))
    assert (again / "hist-20261001.json").read_text() == october_text
    november = tmp_path / "nov"
    callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(november))
    invoice = read_invoices(november)["hist-20261101"]
    assert invoice["plan_id"] == "starter"
    seconds = {line["code"]: line["quantity"] for line in invoice["lines"]}
    assert seconds["included_seconds"] == "120"
