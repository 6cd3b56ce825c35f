from __future__ import annotations

import pytest

from bench.report import Row, cpu_us_text, latency_table, ratio_text, targets_table, throughput_table
from bench.steady import steady


@pytest.mark.parametrize(
    ("rate", "baseline", "text"),
    [
        (4400.0, 2200.0, "2.00x"),
        (550.0, 2200.0, "0.25x"),
        (2200.0, 2200.0, "1.00x"),
        (1.0, 3.0, "0.33x"),
        (None, 2200.0, "—"),
        (550.0, None, "—"),
        (550.0, 0.0, "—"),
    ],
)
def test_ratio_text(rate: float | None, baseline: float | None, text: str) -> None:
    assert ratio_text(rate, baseline) == text


def test_row_rate_needs_count_and_time() -> None:
    assert Row("x", "x", 50000, 10.0).per_second == 5000.0
    assert Row("x", "x", 50000, 0.0).per_second is None
    assert Row("x", "x", None, 10.0).per_second is None


def test_throughput_table_ratios_to_the_stateful_agent() -> None:
    rows = [
        Row("faust", "bare | agent", 50000, 10.0, "msg/s", 70, "first → last", cpu_seconds=9.25),
        Row("stateful", "stateful agent", 50000, 25.0, "msg/s", 80),
        Row("replay", "replay", 50000, 4.0, "calls/s"),
        Row("rss", "peak RSS only", peak_rss_mib=900),
    ]
    assert throughput_table(rows) == "\n".join(
        [
            "| measured | rate | vs stateful agent | records | seconds | CPU µs/record | peak RSS MiB "
            "| how |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            "| bare \\| agent | 5,000 msg/s | 2.50x | 50,000 | 10.0 | 185 | 70 | first → last |",
            "| stateful agent | 2,000 msg/s | 1.00x | 50,000 | 25.0 | — | 80 |  |",
            "| replay | 12,500 calls/s | 6.25x | 50,000 | 4.0 | — | — |  |",
            "| peak RSS only | — | — | — | — | — | 900 |  |",
        ]
    )


def test_throughput_table_without_the_baseline_has_no_ratios() -> None:
    table = throughput_table([Row("faust", "bare agent", 1000, 2.0)])
    assert table.splitlines()[-1] == "| bare agent | 500 msg/s | — | 1,000 | 2.0 | — | — |  |"


@pytest.mark.parametrize(
    ("cpu_seconds", "count", "text"),
    [(9.25, 50000, "185"), (1.5, 1000, "1,500"), (None, 1000, "—"), (1.0, None, "—"), (1.0, 0, "—")],
)
def test_cpu_us_text(cpu_seconds: float | None, count: int | None, text: str) -> None:
    assert cpu_us_text(cpu_seconds, count) == text


def test_latency_table() -> None:
    result: dict[str, object] = {
        "balance_latency_ms_p50": 6.6,
        "balance_latency_ms_p99": 25.8,
        "authorize_latency_ms_p50": 6.7,
        "authorize_latency_ms_p99": 86.8,
        "authorize_latency_ms_p99_idle": 7.0,
        "api_balance_latency_ms_p50": 0.4,
        "api_balance_latency_ms_p99": 1.2,
        "api_authorize_latency_ms_p50": 0.5,
        "api_authorize_latency_ms_p99": 1.9,
        "api_authorize_latency_ms_p99_idle": 0.8,
        "produce_to_balance_calls": 1234,
        "produce_to_balance_ms_p50": 7.4,
        "produce_to_balance_ms_p99": 18.5,
    }
    assert latency_table(result) == "\n".join(
        [
            "| latency | p50 ms | p99 ms |",
            "|---|---:|---:|",
            "| `GET /balances` under the paced load | 6.6 | 25.8 |",
            "| `GET /authorize` under the paced load | 6.7 | 86.8 |",
            "| tenant API `GET /balances` under the paced load | 0.4 | 1.2 |",
            "| tenant API `GET /authorize` under the paced load | 0.5 | 1.9 |",
            "| `GET /authorize` idle | — | 7.0 |",
            "| tenant API `GET /authorize` idle | — | 0.8 |",
            "| call produced → visible in the balance, every call of the load (1234) | 7.4 | 18.5 |",
        ]
    )


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        # start-up (nothing committed), then 1,000 records in 2 s, then the idle check (no change)
        (
            [(0.0, 0), (5.0, 0), (6.0, 200), (7.0, 700), (8.0, 1200), (9.0, 1200), (20.0, 1200)],
            {"steady_records": 1000, "steady_seconds": 2.0, "steady_per_second": 500},
        ),
        ([(0.0, 0), (1.0, 300)], {"steady_records": 0, "steady_seconds": 0.0, "steady_per_second": None}),
        ([], {"steady_records": 0, "steady_seconds": 0.0, "steady_per_second": None}),
    ],
)
def test_steady_rate_leaves_out_start_up_and_the_idle_tail(
    samples: list[tuple[float, int]], expected: dict[str, object]
) -> None:
    assert steady(samples) == expected


def test_targets_table_says_met_or_missed_beside_the_reference() -> None:
    rows = [
        Row("faust", "bare", 10_000, 4.0),  # 2,500/s
        Row("worker-2-steady", "net", 9_000, 6.0),  # 1,500/s
        Row("kafka-avro", "raw", 30_000, 1.0),
        Row("replay", "replay", 31_000, 1.0),
    ]
    text = targets_table(rows, {"api_authorize_latency_ms_p99": 7.5}, 2)
    lines = text.splitlines()
    assert lines[2] == (
        "| `worker --until-idle`, 2 processes, net of start-up ≥ bare Faust agent (one process) "
        "| 1,500 events/s | 2,500 events/s | 0.60x | no |"
    )
    assert (
        lines[3]
        == "| replay ≥ raw confluent-kafka loop with Avro | 31,000 calls/s | 30,000 calls/s | 1.03x | yes |"
    )
    assert lines[4] == "| tenant API `/authorize` p99 < 5 ms under the paced load | 7.50 ms | 5 ms | — | no |"
    assert targets_table([], None, 2) == ""
