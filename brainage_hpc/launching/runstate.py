"""Read a run folder without torch: steps done, planned total, outcome, best metric.

The trainer writes one JSON line per log step and per event (start, resume,
preempt, end, ...) to ``metrics.jsonl`` and names checkpoints by step
(``ckpt-step00000012.pt``, DeepSpeed: ``ds/step00000012/`` with ``.complete``).
Everything here reads those files only, tolerating a half-written last line
(the trainer may be writing it right now) and lines that are not JSON.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunStatus", "checkpointed_step", "read_metrics", "run_status"]

_CKPT_RE = re.compile(r"^ckpt-step(\d+)\.pt$")
_DS_RE = re.compile(r"^step(\d+)$")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON record of ``metrics.jsonl`` ([] when there is none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the line being written, or damage: skip it, never fail a status query
        if isinstance(rec, dict):
            records.append(rec)
    return records


def checkpointed_step(run_dir: str | Path) -> int:
    """Step of the newest checkpoint on disk (0 if none): the progress a restart keeps."""
    run_dir = Path(run_dir)
    best = 0
    try:
        for p in run_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_file():
                best = max(best, int(m.group(1)))
        ds = run_dir / "ds"
        if ds.is_dir():
            for p in ds.iterdir():
                m = _DS_RE.match(p.name)
                if m and (p / ".complete").exists():
                    best = max(best, int(m.group(1)))
    except OSError:
        return best
    return best


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands, from its folder alone.

    ``status`` is ``finished`` (ended completed/early-stopped), ``failed``
    (ended diverged, or an error recorded by the launcher), ``unfinished``
    (started, no end yet, or stopped/preempted) or ``not started``.
    """

    run_dir: Path
    status: str
    step: int  # newest step logged
    total: int | None  # planned optimizer steps (from the newest "start" event)
    outcome: str | None  # the trainer's last "end" outcome
    monitor: str  # the monitored metric's name (train.monitor)
    best: float | None  # best value of ``monitor`` over the run
    best_step: int | None
    checkpoint_step: int

    def progress_text(self) -> str:
        """``step 12/40`` (or ``step 12`` before the total is known)."""
        return f"step {self.step}/{self.total}" if self.total else f"step {self.step}"


def _monitor(run_dir: Path) -> tuple[str, str]:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        train = cfg.get("train") or {}
        return str(train.get("monitor", "val/loss")), str(train.get("monitor_mode", "min"))
    except (OSError, yaml.YAMLError, AttributeError):
        return "val/loss", "min"


def run_status(run_dir: str | Path, monitor: str | None = None, mode: str | None = None) -> RunStatus:
    """Summarise ``run_dir`` (the monitored metric defaults to the run's own config)."""
    run_dir = Path(run_dir)
    cfg_monitor, cfg_mode = _monitor(run_dir)
    monitor, mode = monitor or cfg_monitor, mode or cfg_mode
    step, total, outcome, started = 0, None, None, False
    best: float | None = None
    best_step: int | None = None
    for rec in read_metrics(run_dir):
        s = rec.get("step")
        if isinstance(s, int):
            step = max(step, s)
        kind = rec.get("event")
        if kind == "start":
            started = True
            outcome = None  # a restart after an end (extended run) is running again
            if isinstance(rec.get("total_steps"), int):
                total = rec["total_steps"]
        elif kind == "end":
            outcome = rec.get("outcome")
        value = rec.get(monitor)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if best is None or (value < best if mode == "min" else value > best):
                best, best_step = float(value), s if isinstance(s, int) else None
    failed_marker = (run_dir / "launch_error.txt").is_file()
    if outcome in ("completed", "early_stopped"):
        status = "finished"
    elif outcome == "diverged" or failed_marker:
        status = "failed"
    elif started:
        status = "unfinished"
    else:
        status = "not started"
    return RunStatus(run_dir, status, step, total, outcome, monitor, best, best_step, checkpointed_step(run_dir))
