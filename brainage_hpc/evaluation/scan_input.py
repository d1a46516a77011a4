"""One scan file -> the model's input volume, or a one-line reason why not.

This is the only place where ``brainage predict`` prepares a scan: it calls
:func:`brainage_hpc.ingest.prepare.prepare_scan` (contract 5) with the run's own
``PreprocessConfig``, so a scan goes through exactly the pipeline the training
shards went through (skull-stripped or raw), with the same plausibility checks
(a noise cube, a box phantom or a 32 mm volume is an error, not an age) and the
same per-scan QC numbers.

One check is added here from those QC numbers, until the ingest checks have it:
the foreground must not fill more than 85 % of its own bounding box
(``volume_ml`` / box volume). A brain fills about half of it (an ellipsoid 52 %);
a box phantom with background around it fills all of it, yet passes the extent,
volume, field-of-view and solidity checks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from brainage_hpc.ingest.prepare import PreparedScan, ScanError, prepare_scan

__all__ = ["BOX_FILL_MAX", "PreparedScan", "box_fill", "one_line_error", "prepare_input"]

BOX_FILL_MAX = 0.85


def box_fill(qc: dict[str, float]) -> float | None:
    """Foreground volume / its bounding-box volume, from ``prepare_scan``'s QC numbers (None when absent)."""
    try:
        box_ml = qc["extent_x_mm"] * qc["extent_y_mm"] * qc["extent_z_mm"] / 1000.0
        fill = qc["volume_ml"] / box_ml
    except (KeyError, ZeroDivisionError, TypeError):
        return None
    return fill if math.isfinite(fill) else None


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
    prepared = prepare_scan(path, pcfg)
    fill = box_fill(prepared.qc)
    if fill is not None and fill > BOX_FILL_MAX:
        ext = " x ".join(f"{prepared.qc[f'extent_{a}_mm']:.0f}" for a in "xyz")
        raise ScanError(f"{path}: foreground fills {fill:.0%} of its {ext} mm bounding box (a brain fills about half): "
                        "a box or phantom, not a skull-stripped brain")
    return prepared
