"""The results CSV: one row per (kernel, provider, mode, dtype, shape), read, merged and written
atomically. Plain `csv`, no torch: `benchmarks.report` merges device runs with it."""
from __future__ import annotations

import csv
import os
from pathlib import Path

COLUMNS = ["kernel", "provider", "mode", "dtype", "shape", "median_ms", "p20_ms", "p80_ms", "peak_bytes",
           "achieved", "achieved_unit", "pct_of_peak", "max_abs_diff", "backend", "status", "device",
           "torch", "triton", "fastrlhf", "liger_kernel", "trl", "date", "note"]
KEY = ("kernel", "provider", "mode", "dtype", "shape")
SKIPPED = "skipped"  # status prefix of a row a time budget left out: it never replaces a measured row


def read_rows(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge(rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """`rows` with `new_rows` merged in: a new row replaces the old one with the same key, except that a
    "skipped: ..." row never replaces an existing one (a cut run must not erase an earlier measurement)."""
    rows = list(rows)
    index = {tuple(r.get(k, "") for k in KEY): i for i, r in enumerate(rows)}
    for row in new_rows:
        key = tuple(row.get(k, "") for k in KEY)
        if key in index:
            if not str(row.get("status", "")).startswith(SKIPPED):
                rows[index[key]] = row
        else:
            index[key] = len(rows)
            rows.append(row)
    return rows


def write_rows(path: Path, new_rows: list[dict], *, fresh: bool = False) -> None:
    """Merge `new_rows` into the CSV at `path` (see `merge`), or replace it (`fresh`)."""
    path = Path(path)
    rows = merge([] if fresh else read_rows(path), new_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    os.replace(tmp, path)
