"""Prepare one scan for inference exactly as the training shards were made (contract 5).

``brainage predict`` calls :func:`prepare_scan` with the run's own
:class:`~brainage_hpc.ingest.preprocess.PreprocessConfig` (from the checkpoint), so
a raw head goes through the same N4 / registration / brain extraction as the
training cohort and a skull-stripped file through the same crop and intensity
steps. Every problem is a :class:`ScanError` whose message is one line naming the
file: unreadable, bad gzip CRC, not 3D, non-finite, no voxels > 0, implausible
brain extent/volume/shape, registration failed...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainage_hpc.ingest.preprocess import PreprocessConfig, prepare_volume

__all__ = ["PreparedScan", "ScanError", "prepare_scan"]


class ScanError(ValueError):
    """A scan that cannot be prepared; the message is one line starting with the file name."""


@dataclass
class PreparedScan:
    """One scan, ready for a model.

    Attributes:
        volume: (D, H, W) float16 on the run's grid, RAS, background 0.
        qc: per-scan QC numbers (brain extent in mm, volume in ml, contrast; raw
            pipeline: registration similarity, SNR...).
        warnings: non-fatal findings (e.g. a QC number at the edge of its range).
    """

    volume: np.ndarray
    qc: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _one_line(exc: BaseException, name: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.startswith(name) else f"{name}: {type(exc).__name__}: {text}"


def prepare_scan(path: str | Path | Any, pcfg: PreprocessConfig) -> PreparedScan:
    """Load, check and preprocess one T1w scan with the run's preprocessing.

    Args:
        path: a NIfTI file (``.nii`` / ``.nii.gz``) or a nibabel image.
        pcfg: the run's preprocessing config (``pipeline`` decides skull-stripped vs raw).

    Returns:
        A :class:`PreparedScan`.

    Raises:
        ScanError: anything wrong with this scan (one line naming the file). Programming
            errors inside the libraries are also reported this way, so one bad file
            never ends a batch of predictions.
    """
    name = str(path) if isinstance(path, (str, Path)) else str(getattr(path, "get_filename", lambda: None)() or "<image>")
    try:
        volume, qc, warnings = prepare_volume(path, pcfg)
    except ScanError:
        raise
    except FileNotFoundError as exc:
        raise ScanError(_one_line(exc, name)) from exc
    except Exception as exc:  # noqa: BLE001  (one bad scan: one line, never a traceback)
        raise ScanError(_one_line(exc, name)) from exc
    return PreparedScan(volume=volume, qc=qc, warnings=warnings)
