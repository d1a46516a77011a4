"""One scan file -> the model's input volume, or a one-line reason why not.

This is the only place where ``brainage predict`` prepares a scan: it calls
:func:`brainage_hpc.ingest.prepare.prepare_scan` (contract 5) with the run's own
``PreprocessConfig``, so a scan goes through exactly the pipeline the training
shards went through (skull-stripped or raw), with the same plausibility checks
(a noise cube, a box phantom or a 32 mm volume is an error, not an age) and the
same per-scan QC numbers. The box-phantom check (foreground filling more than 85 % of
its bounding box) lives with the others in :mod:`brainage_hpc.ingest.plausibility`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainage_hpc.ingest.prepare import PreparedScan, prepare_scan

__all__ = ["PreparedScan", "one_line_error", "prepare_input"]


def one_line_error(exc: BaseException, path: str | Path) -> str:
    """The first line of an exception's message, naming ``path`` once.

    Errors that are not the usual ``OSError``/``ValueError`` keep their type name, so a
    bug (``RuntimeError`` from deep inside a library) is not mistaken for bad input.

    Example:
        >>> one_line_error(RuntimeError("grid_sampler(): boom\\nmore"), "a.nii")
        'a.nii: RuntimeError: grid_sampler(): boom'
    """
    text = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    if not isinstance(exc, (OSError, ValueError)):
        text = f"{type(exc).__name__}: {text}"
    return text if str(path) in text else f"{path}: {text}"


def prepare_input(path: str | Path, pcfg: Any) -> PreparedScan:
    """Load, check and preprocess one scan exactly as the run's shards were prepared.

    Args:
        path: NIfTI file (any shape, voxel size and orientation).
        pcfg: the run's ``PreprocessConfig``.

    Returns:
        ``PreparedScan``: ``volume`` (D, H, W) float16, ``qc`` numbers, ``warnings``.

    Raises:
        ScanError: (a ``ValueError``) unreadable, not 3D, implausible brain... one line naming the file.
    """
    return prepare_scan(path, pcfg)
