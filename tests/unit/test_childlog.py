"""pipeline/commands/childlog.py: the cause a failed worker process is given on the run's last line."""

from __future__ import annotations

import io

import pytest

from pipeline.commands.childlog import ChildLog

ENOSPC_LOG = (
    "[2026-12-07 18:38:01,993] [19322] [WARNING] Error in recovery IO error: No space left on device: "
    "While appending to file: /data/worker/v1/tables/alerted-2.db/000004.log: No space left on device"
)
COMMIT = (
    "callmeter: error: commit before a rebalance failed: KafkaError: Commit failed; "
    "restarting from the last commit"
)
READ_ONLY = "ledger sink failed: [Errno 30] Read-only file system: '/x'"


@pytest.mark.parametrize(
    ("lines", "code", "cause"),
    [
        # The process's last error line, without the tail that says what the supervisor does next.
        (["callmeter: error: no local broker running; run `callmeter up`; retrying"], 75,
         "no local broker running; run `callmeter up`"),
        (["callmeter: error: a; restarting from the last commit", "callmeter: error: b"], 1, "b"),
        # A full disk names the cause, not the failed commit that followed from it.
        ([ENOSPC_LOG, COMMIT], 75,
         "Error in recovery IO error: No space left on device: While appending to file: "
         "/data/worker/v1/tables/alerted-2.db/000004.log: No space left on device"),
        ([f"\x1b[?25lcallmeter: error: {READ_ONLY}", COMMIT], 75, READ_ONLY),
        # Nothing said: how it ended.
        (["\x1b[?25l\x08\x1b[?25h"], -9, "killed by SIGKILL"),
        ([], 3, "exit 3"),
    ],
)  # fmt: skip
def test_the_cause_of_a_failure(
    lines: list[str], code: int, cause: str, capsys: pytest.CaptureFixture[str]
) -> None:
    log = ChildLog(io.BytesIO("".join(line + "\n" for line in lines).encode()))
    log.wait()
    assert log.cause(code) == cause
    # Every line is passed on as it came, without the terminal's control characters.
    passed_on = capsys.readouterr().err
    assert "\x1b" not in passed_on and "\x08" not in passed_on
    assert passed_on.splitlines() == [
        line.replace("\x1b[?25l", "") for line in lines if line.strip("\x1b[?25lh\x08")
    ]
