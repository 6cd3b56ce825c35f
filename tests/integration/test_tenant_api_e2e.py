"""The tenant API (``CALLMETER_API_PORT``) answers /authorize, /quota and /balances from the
committed changelogs, in `callmeter worker`'s own process, through the real broker.

Its answers must be the stream worker's own once the workers have committed, whatever happened to the
workers: a restart of the whole service (the view is rebuilt from the changelogs), and a worker stuck
with its transaction open (the view never shows a write that may yet be aborted).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.cli import BackgroundWorker, callmeter
from tests.integration.eventfiles import prov
from tests.integration.test_balances_alerts_e2e import T0, call, subscription, write

pytestmark = pytest.mark.integration

AT = "?at=2026-11-20T00:00:00Z"


def api_get(port: str, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def eventually(answer: Callable[[], Any], expected: Any, what: str, timeout: float = 30) -> None:
    """The view applies a change once its transaction commits (about a second after the worker)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = answer()
        if last == expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: {last} != {expected}")


def _env(cm_env: dict[str, str]) -> dict[str, str]:
    return dict(cm_env, CALLMETER_API_PORT=str(free_port(1)))


def test_tenant_api_answers_as_the_worker_does_after_commits_and_a_restart(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(cm_env)
    port = env["CALLMETER_API_PORT"]
    emp = [
        prov(f"e{i}", "qt", f"2026-11-0{i + 2}T10:00:00Z", "EMPLOYEE_ACTIVATED", employee_id=f"emp-{i}")
        for i in range(3)
    ]
    callmeter(
        env,
        "produce",
        write(
            tmp_path / "setup.jsonl", [subscription("blk", "hardstop"), subscription("qt", "starter"), *emp]
        ),
    )
    paths = [f"/authorize/blk{AT}", f"/authorize/qt{AT}", f"/authorize/nobody{AT}", f"/quota/qt{AT}"]
    paths += [f"/balances/blk{AT}", f"/balances/nobody{AT}", "/authorize/blk?at=yesterday"]
    with BackgroundWorker(env) as worker:
        worker.wait_for(lambda s: s["stats"]["consumed"].get("provisioning") == 5, "provisioning")
        for path in paths:
            eventually(lambda p=path: api_get(port, p), worker.get(path), path)
        assert api_get(port, f"/authorize/blk{AT}")[1]["max_call_seconds"] == 120
        assert api_get(port, f"/quota/qt{AT}")[1]["employees"]["summary"] == "3 of 5 employees active"

        # 47 s, then the rest of the 120 s: refused; and qt deactivates one employee.
        callmeter(env, "produce", write(tmp_path / "c1.jsonl", [call("blk", "b1", 47)]))
        eventually(lambda: api_get(port, f"/authorize/blk{AT}")[1]["max_call_seconds"], 73, "47 s used")
        later = [
            call("blk", "b2", 73, T0.replace(hour=10)),
            prov("e9", "qt", "2026-11-10T00:00:00Z", "EMPLOYEE_DEACTIVATED", employee_id="emp-0"),
        ]
        callmeter(env, "produce", write(tmp_path / "c2.jsonl", later))
        eventually(
            lambda: api_get(port, f"/authorize/blk{AT}")[1]["reason"],
            "allowance_used_up",
            "allowance used up",
        )
        for path in paths:
            eventually(lambda p=path: api_get(port, p), worker.get(path), path)
        assert api_get(port, f"/quota/qt{AT}")[1]["employees"]["active"] == 2
        assert api_get(port, f"/balances/blk{AT}")[1]["used_seconds"] == 120
        assert api_get(port, "/nothing")[0] == 404
        status = api_get(port, "/status")[1]
        assert status["caught_up"] is True and status["tenants"] == 2

    # A new service rebuilds the view from the changelogs alone.
    with BackgroundWorker(env) as worker:
        for path in paths:
            eventually(lambda p=path: api_get(port, p), worker.get(path), path)
        assert api_get(port, f"/balances/blk{AT}")[1]["used_seconds"] == 120


def test_tenant_api_shows_only_committed_state_while_a_worker_holds_a_transaction_open(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(cm_env)
    port = env["CALLMETER_API_PORT"]
    calls = [call("blk", f"k{i}", 10, T0.replace(minute=i)) for i in range(6)]
    callmeter(env, "produce", write(tmp_path / "events.jsonl", [subscription("blk", "hardstop"), *calls]))
    # The worker stops inside the sixth call's critical section, its writes sent (linger 100 ms) and
    # never committed: the live state has all 60 s, the committed state at most the first 50.
    with BackgroundWorker(dict(env, CALLMETER_CRASH_AT="after-event:7:hang")) as worker:
        worker.wait_for(lambda s: s["stats"]["consumed"].get("call") == 6, "sixth call")
        assert worker.get(f"/balances/blk{AT}")[1]["used_seconds"] == 60
        time.sleep(3)  # the uncommitted writes are on the broker now
        eventually(lambda: api_get(port, "/status")[1]["caught_up"], True, "view caught up")
        status, body = api_get(port, f"/balances/blk{AT}")
        assert status == 404 or body["used_seconds"] <= 50, body
    # The next worker rates the sixth call again from the last commit: counted once.
    with BackgroundWorker(env) as worker:
        eventually(lambda: api_get(port, f"/balances/blk{AT}")[1].get("used_seconds"), 60, "balance")
        assert api_get(port, f"/authorize/blk{AT}")[1]["max_call_seconds"] == 60
        assert worker.get(f"/balances/blk{AT}")[1]["used_seconds"] == 60
