"""Small helpers shared by the benchmarks: aligned plain-text tables and percentiles."""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


_NUMERIC = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?\s?(ms|s|x|%)?$")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned table: numeric columns right-aligned, the others left-aligned.

    Floats are printed with 3 significant decimals unless given as strings already.
    """
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(_NUMERIC.match(r[i]) or r[i] in ("-", "n/a")
                                  for r in cells[1:]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3f}"
    return str(value)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON (NaN becomes null)."""
    with open(path, "w") as handle:
        json.dump(_clean(payload), handle, indent=2)
        handle.write("\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def busy_cpus(interval: float = 0.5) -> float:
    """How many CPUs the whole machine kept busy over `interval` seconds (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = max(total1 - total0, 1)
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / total)


def wait_for_quiet(max_wait: float, threshold: float = 0.5, interval: float = 0.5) -> float:
    """Wait (at most `max_wait` s) until fewer than `threshold` CPUs are busy.

    Returns the busy CPUs last seen. On a shared machine this keeps the runs that are
    compared with each other out of the worst bursts of other people's work.
    """
    deadline = time.monotonic() + max_wait
    busy = busy_cpus(interval)
    while busy >= threshold and time.monotonic() < deadline:
        busy = busy_cpus(interval)
    return busy
