"""One table for a sweep: each run's overrides, best monitored metric, steps and status.

Rows are sorted by the monitored metric (``train.monitor``, best first); runs
without a value follow, failed or unfinished ones are listed as such, never
dropped. Points of ``sweep.json`` that never started are listed too.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

from brainage_hpc.launching.runstate import RunStatus, run_status
from brainage_hpc.launching.sweep import read_sweep

__all__ = ["SummaryFiles", "SummaryRow", "collect_rows", "markdown_table", "write_summary"]

CSV_NAME, MD_NAME = "sweep_summary.csv", "sweep_summary.md"
_FIELDS = ["run", "overrides", "metric", "best", "best_step", "steps", "total_steps", "status", "error"]


@dataclass(frozen=True)
class SummaryRow:
    run: str
    overrides: str
    status: RunStatus
    error: str

    @property
    def as_dict(self) -> dict[str, str]:
        s = self.status
        return {
            "run": self.run,
            "overrides": self.overrides,
            "metric": s.monitor,
            "best": "" if s.best is None else f"{s.best:.6g}",
            "best_step": "" if s.best_step is None else str(s.best_step),
            "steps": str(s.step),
            "total_steps": "" if s.total is None else str(s.total),
            "status": s.status,
            "error": self.error,
        }


def _run_folders(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and ((p / "metrics.jsonl").exists() or (p / "config.yaml").exists()))


def _mode(rows: list[SummaryRow]) -> str:
    import yaml

    for row in rows:
        try:
            cfg = yaml.safe_load((row.status.run_dir / "config.yaml").read_text()) or {}
            return str((cfg.get("train") or {}).get("monitor_mode", "min"))
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    return "min"


def collect_rows(runs_dir: str | Path) -> list[SummaryRow]:
    """Every run under ``runs_dir`` (and every sweep point), best monitored metric first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: no such folder (expected a sweep folder with one run folder per point)")
    points = {p.name: " ".join(p.overrides) for p in read_sweep(runs_dir)}
    folders = {p.name: p for p in _run_folders(runs_dir)}
    names = list(points) + sorted(n for n in folders if n not in points)
    rows = []
    for name in names:
        folder = folders.get(name, runs_dir / name)
        try:
            error = (folder / "launch_error.txt").read_text().strip()
        except OSError:
            error = ""
        rows.append(SummaryRow(name, points.get(name, ""), run_status(folder), error))
    mode = _mode(rows)
    sign = 1.0 if mode == "min" else -1.0

    def key(row: SummaryRow) -> tuple[int, float, str]:
        s = row.status
        group = 0 if s.best is not None and s.status != "failed" else 1 if s.status != "failed" else 2
        value = sign * s.best if s.best is not None and math.isfinite(s.best) else math.inf
        return group, value, row.run

    return sorted(rows, key=key)


def markdown_table(rows: list[SummaryRow]) -> str:
    metric = rows[0].status.monitor if rows else "metric"
    lines = [f"| run | overrides | best {metric} | at step | steps | status |", "|---|---|---|---|---|---|"]
    for row in rows:
        d = row.as_dict
        steps = f"{d['steps']}/{d['total_steps']}" if d["total_steps"] else d["steps"]
        status = d["status"] + (f" ({d['error']})" if d["error"] else "")
        lines.append(f"| {d['run']} | {d['overrides'] or '-'} | {d['best'] or '-'} | {d['best_step'] or '-'} | {steps} | {status.replace('|', '/')} |")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SummaryFiles:
    csv: Path
    markdown: Path
    table: str
    rows: list[SummaryRow]


def write_summary(runs_dir: str | Path, out_dir: str | Path | None = None) -> SummaryFiles:
    """Write ``sweep_summary.csv`` and ``sweep_summary.md`` (into ``runs_dir`` unless ``out_dir``)."""
    rows = collect_rows(runs_dir)
    out = Path(out_dir) if out_dir is not None else Path(runs_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.as_dict)
    table = markdown_table(rows)
    csv_path, md_path = out / CSV_NAME, out / MD_NAME
    _atomic_write(csv_path, buf.getvalue())
    _atomic_write(md_path, table + "\n")
    return SummaryFiles(csv_path, md_path, table, rows)
