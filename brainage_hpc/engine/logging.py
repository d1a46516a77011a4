"""Run logging on rank 0: TensorBoard, ``metrics.jsonl`` and a tqdm bar.

Other ranks get a :class:`RunLogger` whose methods do nothing, so the trainer
never checks the rank before logging.

After a resume from step S (``open(S)``), records of later steps, written by a
run that was killed after its last checkpoint, are dropped: ``metrics.jsonl`` is
rewritten without them and TensorBoard gets ``purge_step=S+1``, so no step is
logged twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["RunLogger", "mid_slices"]


def mid_slices(volume: torch.Tensor) -> np.ndarray:
    """Axial, coronal and sagittal mid-slices side by side, scaled to [0, 1].

    Args:
        volume: (1, D, H, W) or (D, H, W) tensor.
    Returns:
        (1, H', W') float32 image for ``SummaryWriter.add_image`` (CHW).
    """
    v = volume.detach().float().cpu().reshape(volume.shape[-3:]).numpy()
    d, h, w = v.shape
    planes = [v[d // 2, :, :], v[:, h // 2, :], v[:, :, w // 2]]
    rows = max(p.shape[0] for p in planes)
    padded = [np.pad(p, ((0, rows - p.shape[0]), (0, 0))) for p in planes]
    img = np.concatenate(padded, axis=1)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    img = np.clip((img - lo) / (hi - lo + 1e-6), 0, 1).astype(np.float32)
    return img[None]


class RunLogger:
    """TensorBoard writer + JSON-lines metrics; active on rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, progress: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.writer: Any = None
        self._jsonl: Any = None
        self._bar = None
        self._progress = progress and enabled

    def open(self, resume_step: int | None = None) -> None:
        """Open the files; with ``resume_step``, drop what was logged after it first.

        Nothing is written before this (or the first record, which opens without
        dropping), so a refused resume leaves the run folder as it was.
        """
        if not self.enabled or self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = self.run_dir / "metrics.jsonl"
        purge = None
        if resume_step is not None:
            _truncate_jsonl(path, resume_step)
            purge = resume_step + 1
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)
        self._jsonl = open(path, "a", buffering=1)

    def scalars(self, values: dict[str, float], step: int, **extra: Any) -> None:
        """Log scalars to TensorBoard and one JSON line (``step`` and ``extra`` included)."""
        if not self.enabled:
            return
        self.open()
        clean = {k: float(v) for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        for k, v in clean.items():
            self.writer.add_scalar(k, v, step)
        record = {"step": step, "time": round(time.time(), 3), **extra, **clean}
        self._jsonl.write(json.dumps(record) + "\n")

    def image(self, tag: str, volume: torch.Tensor, step: int) -> None:
        if self.enabled:
            self.open()
            self.writer.add_image(tag, mid_slices(volume), step, dataformats="CHW")

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """A non-metric record in metrics.jsonl (start, resume, preempt, end)."""
        if self.enabled:
            self.open()
            self._jsonl.write(json.dumps({"event": kind, "step": step, "time": round(time.time(), 3), **fields}) + "\n")

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.open()
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        clean = {f"hparam/{k}": float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self.writer.add_hparams(flat, clean, run_name="hparams")

    # -------------------------------------------------------------- progress bar

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if self._progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             disable=os.environ.get("BRAINAGE_NO_PROGRESS") == "1")

    def update_bar(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self.enabled and self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self._jsonl.close()
        self.enabled = False


def _truncate_jsonl(path: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` without records of steps after ``step`` (temp file + rename)."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            record_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            record_step = None  # a line torn by kill -9: drop it
        if isinstance(record_step, (int, float)) and record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
