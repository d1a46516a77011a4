"""Combine the part files of a cohort run into one CSV, one row per planned scan.

For every scan of the plan the merge takes, from any part file in the folder, the
newest successful record of the plan's model whose key (path, size, mtime) matches the file as it is now,
else the newest error record; a scan with no record gets an error row that names the
part that owed it and whether that part file is missing. So the CSV always has one row
per scan, in plan order, and a missing part is named, never silently absent.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainage_hpc.evaluation.parts import Plan, iter_part_files, part_name, read_records
from brainage_hpc.evaluation.rows import build_row, output_columns
from brainage_hpc.evaluation.scans import failure_message, scan_key

__all__ = ["MergeSummary", "collect_rows", "merge_parts", "read_sessions"]


@dataclass
class MergeSummary:
    """What a merge found.

    Attributes:
        rows: one dict per output row (plan failures first, then planned scans in order).
        n_ok: scans with a prediction; ``n_failed``: scans or inputs with an error; ``n_missing``:
            scans with no record at all.
        missing_parts: part file name -> planned scans it owed, for parts whose file does not exist.
        incomplete_parts: part file name -> scans it owes but has no record for (file exists).
        scored_more_than_once: scans with more than one successful record for the same key.
        dropped_lines: torn or damaged lines skipped in the part files.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    n_ok: int = 0
    n_failed: int = 0
    n_missing: int = 0
    missing_parts: dict[str, int] = field(default_factory=dict)
    incomplete_parts: dict[str, int] = field(default_factory=dict)
    scored_more_than_once: int = 0
    dropped_lines: int = 0

    @property
    def complete(self) -> bool:
        """Every planned scan has a record (success or error)."""
        return self.n_missing == 0

    @property
    def errors(self) -> list[str]:
        """The error text of every failed or missing row, in row order."""
        return [r["error"] for r in self.rows if r.get("error")]


def _current_key(path: str) -> tuple[str, int, int]:
    try:
        return scan_key(path)
    except OSError:
        return (os.path.abspath(path), -1, -1)


def read_sessions(parts_dir: Path) -> list[dict[str, Any]]:
    """Every ``session`` record (start/end of a task run, with times and counts) of every part."""
    out = []
    for _, _, path in iter_part_files(parts_dir):
        records, _ = read_records(path)
        out += [dict(r, part=path.name) for r in records if r.get("kind") == "session"]
    return out


def collect_rows(parts_dir: Path, plan: Plan) -> MergeSummary:
    """Rows for every planned scan from the records in ``parts_dir`` (nothing is written)."""
    summary = MergeSummary()
    by_path: dict[str, list[dict[str, Any]]] = defaultdict(list)
    present: set[str] = set()
    for _, _, path in iter_part_files(parts_dir):
        present.add(path.name)
        records, dropped = read_records(path)
        summary.dropped_lines += dropped
        for rec in records:
            if rec.get("kind") != "scan" or not isinstance(rec.get("key"), list) or len(rec["key"]) != 3:
                continue
            if plan.model and rec.get("model") != plan.model:
                continue  # scored by other weights: not an answer of this plan's model
            by_path[str(rec["key"][0])].append(rec)

    for failure in plan.failures:
        row = build_row(None, failure.file or failure.subject, None, error=failure_message(failure))
        row["subject"] = failure.subject
        summary.rows.append(row)
        summary.n_failed += 1

    missing_parts: Counter[str] = Counter()
    incomplete_parts: Counter[str] = Counter()
    for index, scan in enumerate(plan.scans):
        key: list[Any] = list(_current_key(scan.path))
        records = by_path.get(str(key[0]), [])
        matching = [r for r in records if r["key"] == key]
        ok = [r for r in matching if not r.get("error")]
        if len(ok) > 1:
            summary.scored_more_than_once += 1
        if ok or matching:
            rec = (ok or matching)[-1]
            summary.rows.append(build_row(scan, scan.path, rec))
            if rec.get("error"):
                summary.n_failed += 1
            else:
                summary.n_ok += 1
            continue
        summary.n_missing += 1
        owner = part_name(plan.task_of(index), plan.tasks)
        if records:
            why = f"{scan.path}: file changed after it was scored by {owner}; run the task again to score it"
            incomplete_parts[owner] += 1
        elif owner not in present:
            why = f"{scan.path}: not scored: part {owner} is missing (the task never ran, or its file was lost)"
            missing_parts[owner] += 1
        else:
            why = f"{scan.path}: not scored: part {owner} has no record for it (task stopped or still running; run it again)"
            incomplete_parts[owner] += 1
        summary.rows.append(build_row(scan, scan.path, None, error=why))
    summary.missing_parts = dict(sorted(missing_parts.items()))
    summary.incomplete_parts = dict(sorted(incomplete_parts.items()))
    return summary


def merge_parts(parts_dir: Path, plan: Plan, out_csv: Path) -> MergeSummary:
    """:func:`collect_rows`, then write the CSV atomically (always, even when scans are missing)."""
    from brainage_hpc.report import write_csv

    summary = collect_rows(parts_dir, plan)
    columns = output_columns(summary.rows)
    write_csv(out_csv, columns, [[row.get(c) for c in columns] for row in summary.rows])
    return summary
