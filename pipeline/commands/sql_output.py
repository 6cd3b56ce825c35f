"""`callmeter sql` output: ``table`` (aligned, for a terminal), ``csv`` (with a header) or ``json`` (an
array of one object per row). csv and json are written row by row as the ledger produces them; a table
is aligned over the rows shown, which the row limit bounds (use csv or json for large exports)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, TextIO

from sinks.readonly import QueryStream


def write_result(stream: QueryStream, fmt: str, out: TextIO) -> int:
    """Write the stream's rows in ``fmt``; return how many were written."""
    columns = stream.columns
    n = 0
    if fmt == "json":
        out.write("[")
        for row in stream.rows:
            out.write(("\n" if n == 0 else ",\n") + json.dumps(dict(zip(columns, row, strict=True))))
            n += 1
        out.write("\n]\n" if n else "]\n")
        return n
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in stream.rows:
            writer.writerow(["" if v is None else _cell(v) for v in row])
            n += 1
        return n
    rows = list(stream.rows)
    out.write(render_table(columns, rows, more=stream.truncated))
    return len(rows)


def render_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], more: bool = False) -> str:
    count = f"{len(rows)} row{'s' if len(rows) != 1 else ''}{', more not shown' if more else ''}"
    if not columns:
        return f"({count})\n"
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(_numeric(r[i]) for r in rows) and bool(rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    text = [line(list(columns)), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    text.append(f"({count})")
    return "\n".join(text) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, str):
        try:
            Decimal(value)
        except ArithmeticError:
            return False
        return value.strip() != "" and not value.lower().startswith(("nan", "inf", "-inf"))
    return False
