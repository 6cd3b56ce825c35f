"""The one table `make bench` prints: pure formatting, no I/O.

Every throughput row carries its ratio to the straightforward stateful Faust agent measured in the same
run on the same broker: on this shared 2-core machine absolute figures move by about 20 % from run to
run, so only figures side by side compare.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BASELINE = "stateful"
"""The key of the row every ratio is taken against."""


@dataclass(frozen=True)
class Row:
    key: str
    """Short stable name (``faust``, ``stateful``, ``worker-2``, ...), for lookups and the baseline."""
    what: str
    """What was measured, as the table's first column says it."""
    count: int | None = None
    """Records (or calls) the rate is over."""
    seconds: float | None = None
    unit: str = "msg/s"
    peak_rss_mib: int | None = None
    note: str = ""
    cpu_seconds: float | None = None
    """CPU time of the measured process(es) over the run, for the CPU cost per record."""

    @property
    def per_second(self) -> float | None:
        if self.count is None or not self.seconds:
            return None
        return self.count / self.seconds


def cpu_us_text(cpu_seconds: float | None, count: int | None) -> str:
    """CPU microseconds per record, ``—`` when not measured."""
    if cpu_seconds is None or not count:
        return "—"
    return f"{cpu_seconds / count * 1e6:,.0f}"


def ratio_text(rate: float | None, baseline: float | None) -> str:
    """``rate`` as a multiple of ``baseline``: ``0.45x``, ``—`` when either is missing."""
    if rate is None or not baseline:
        return "—"
    return f"{rate / baseline:.2f}x"


def rate_text(rate: float | None, unit: str) -> str:
    if rate is None:
        return "—"
    return f"{rate:,.0f} {unit}"


def _cell(text: str) -> str:
    # A pipe would end the cell early in Markdown.
    return text.replace("|", "\\|")


def baseline_rate(rows: Iterable[Row]) -> float | None:
    return next((row.per_second for row in rows if row.key == BASELINE), None)


def throughput_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per row with rate, ratio to the stateful agent, count, seconds, CPU per record
    and peak RSS."""
    base = baseline_rate(rows)
    lines = [
        "| measured | rate | vs stateful agent | records | seconds | CPU µs/record | peak RSS MiB | how |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        rate = row.per_second
        cells = [
            row.what,
            rate_text(rate, row.unit),
            ratio_text(rate, base),
            "—" if row.count is None else f"{row.count:,}",
            "—" if row.seconds is None else f"{row.seconds:.1f}",
            cpu_us_text(row.cpu_seconds, row.count),
            "—" if row.peak_rss_mib is None else str(row.peak_rss_mib),
            row.note,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def latency_table(result: dict[str, object]) -> str:
    """Markdown for ``bench.callmeter_rows.balance_bench``'s result: p50 and p99 per measure, in ms."""
    measures = [
        ("`GET /balances` under the paced load", "balance_latency_ms"),
        ("`GET /authorize` under the paced load", "authorize_latency_ms"),
        ("tenant API `GET /balances` under the paced load", "api_balance_latency_ms"),
        ("tenant API `GET /authorize` under the paced load", "api_authorize_latency_ms"),
    ]
    lines = ["| latency | p50 ms | p99 ms |", "|---|---:|---:|"]
    for what, prefix in measures:
        lines.append(f"| {what} | {result.get(prefix + '_p50', '—')} | {result.get(prefix + '_p99', '—')} |")
    lines.append(f"| `GET /authorize` idle | — | {result.get('authorize_latency_ms_p99_idle', '—')} |")
    idle = result.get("api_authorize_latency_ms_p99_idle", "—")
    lines.append(f"| tenant API `GET /authorize` idle | — | {idle} |")
    lines.append(
        f"| call produced → visible in the balance, every call of the load "
        f"({result.get('produce_to_balance_calls', '—')}) | "
        f"{result.get('produce_to_balance_ms_p50', '—')} | {result.get('produce_to_balance_ms_p99', '—')} |"
    )
    return "\n".join(lines)


def targets_table(rows: Sequence[Row], latency: dict[str, object] | None, processes: int) -> str:
    """Each performance target beside the row it is measured against: met, missed, or not measured."""
    by_key = {row.key: row for row in rows}

    def rate(key: str) -> float | None:
        row = by_key.get(key)
        return row.per_second if row is not None else None

    lines = ["| target | measured | reference | ratio | met |", "|---|---:|---:|---:|---|"]

    def add(what: str, value: float | None, reference: float | None, unit: str) -> None:
        if value is None or not reference:
            return
        ok = value >= reference
        lines.append(
            f"| {what} | {value:,.0f} {unit} | {reference:,.0f} {unit} | {value / reference:.2f}x | "
            f"{'yes' if ok else 'no'} |"
        )

    add(
        f"`worker --until-idle`, {processes} processes, net of start-up ≥ bare Faust agent (one process)",
        rate(f"worker-{processes}-steady"),
        rate("faust"),
        "events/s",
    )
    add("replay ≥ raw confluent-kafka loop with Avro", rate("replay"), rate("kafka-avro"), "calls/s")
    if latency is not None and latency.get("api_authorize_latency_ms_p99") is not None:
        p99 = float(str(latency["api_authorize_latency_ms_p99"]))
        lines.append(
            f"| tenant API `/authorize` p99 < 5 ms under the paced load | {p99:.2f} ms | 5 ms | — | "
            f"{'yes' if p99 < 5 else 'no'} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""
