"""Benchmark records: the dicts written to bench.json, and the printed table.

Every record has `name`, `benchmark`, `baseline` (what hi_jax is compared
with) and `ratio` = baseline seconds / hi_jax seconds (medians), so a ratio
above 1 means hi_jax is faster. Records without a baseline have ratio None.
Timed comparisons add `ratio_fastest`, the same ratio of the fastest
calls, which other processes' load disturbs less. The other fields are the
measured values, in seconds unless the name says otherwise.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.timing import Timing


def comparison(name: str, benchmark: str, baseline: str, hi_jax: Timing,
               reference: Timing, target: str | None = None,
               target_ratio: float | None = None, **values: Any) -> dict[str, Any]:
    """Builds a record comparing hi_jax's median time with the baseline's.

    `target` describes the goal in words; when `target_ratio` is given,
    `target_met` records whether the ratio reached it.
    """
    ratio = reference.median_s / hi_jax.median_s
    record = {"name": name, "benchmark": benchmark, "baseline": baseline,
              "ratio": ratio, "ratio_fastest": reference.min_s / hi_jax.min_s,
              "hi_jax_s": hi_jax.median_s,
              "baseline_s": reference.median_s, "compile_s": hi_jax.compile_s,
              "hi_jax_timing": hi_jax.to_dict(), "baseline_timing": reference.to_dict()}
    if target is not None:
        record["target"] = target
    if target_ratio is not None:
        record["target_met"] = bool(ratio >= target_ratio)
    record.update(values)
    return record


def _format(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits + 1}g}"
    return str(value)


def format_table(records: list[dict[str, Any]]) -> str:
    """Formats the main fields of each record as a plain-text table."""
    columns = [("name", "name"), ("hi_jax_s", "hi_jax s"), ("baseline_s", "baseline s"),
               ("ratio", "ratio"), ("ratio_fastest", "fastest"), ("compile_s", "compile s"),
               ("peak_fraction", "peak frac"), ("target", "target"),
               ("target_met", "met")]
    rows = [[header for _, header in columns]]
    for record in records:
        rows.append([_format(record.get(field)) for field, _ in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)
