"""One scan file -> the model's input volume, or a one-line reason why not.

This is the only place where ``brainage predict`` prepares a scan, so switching to
``brainage_hpc.ingest.prepare.prepare_scan`` (contract 5: the run's own pipeline,
per-scan QC numbers, ``ScanError``) is a change of one call in :func:`prepare_input`.

Until then, :func:`plausibility_problem` rejects inputs that no preprocessing can turn
into a brain (issue 14, S5): a noise cube, a box phantom or a 32 mm object would
otherwise get a confident age. The checks use only the foreground (voxels > 0) of
the skull-stripped input, in mm:

* no voxels > 0 (not skull-stripped, or an inverted image);
* foreground bounding box outside 60-250 mm on any axis (an adult brain is about
  140 x 175 x 120 mm; a 32 mm volume is not a head);
* foreground filling more than 85 % of its bounding box (a brain fills about half
  of it, like an ellipsoid's 52 %; a box or a cube of positive noise fills all of it);
* fewer than half of the foreground voxels with all 6 neighbours in the foreground
  (scattered noise; brains are solid, 75-99 % depending on voxel size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PreparedInput", "one_line_error", "plausibility_problem", "prepare_input"]

_EXTENT_MM = (60.0, 250.0)
_MAX_BOX_FILL = 0.85
_MIN_SOLIDITY = 0.5


@dataclass
class PreparedInput:
    """A scan on the model's grid (the fields of contract 5's ``PreparedScan``).

    Attributes:
        volume: (D, H, W) float16, the run's preprocessing applied.
        qc: per-scan numbers (foreground extent in mm, box fill, solidity).
        warnings: one-line notes that did not stop the scan.
    """

    volume: np.ndarray
    qc: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


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


def plausibility_problem(data: np.ndarray, affine: np.ndarray) -> tuple[str | None, dict[str, float]]:
    """Why a skull-stripped volume cannot be a brain, or None; plus the QC numbers.

    Args:
        data: (X, Y, Z) voxels in file order.
        affine: (4, 4) voxel -> mm.

    Returns:
        (problem or None, ``{"extent_x_mm", "extent_y_mm", "extent_z_mm", "box_fill", "solidity"}``).
    """
    from scipy import ndimage

    fg = data > 0
    if not fg.any():
        return "no voxels > 0 (not skull-stripped, or intensities inverted?)", {}
    idx = np.argwhere(fg)  # (N, 3)
    lo, hi = idx.min(0), idx.max(0) + 1
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))  # mm per voxel axis
    extent = (hi - lo) * spacing
    box = fg[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    box_fill = float(box.mean())
    solidity = float(ndimage.binary_erosion(fg).sum() / fg.sum())
    qc = {"extent_x_mm": float(extent[0]), "extent_y_mm": float(extent[1]), "extent_z_mm": float(extent[2]),
          "box_fill": round(box_fill, 4), "solidity": round(solidity, 4)}
    ext = " x ".join(f"{e:.0f}" for e in extent)
    if extent.min() < _EXTENT_MM[0] or extent.max() > _EXTENT_MM[1]:
        return (f"implausible brain extent {ext} mm (expected {_EXTENT_MM[0]:.0f}-{_EXTENT_MM[1]:.0f} mm per axis; "
                "wrong voxel size or not a brain?)"), qc
    if box_fill > _MAX_BOX_FILL:
        return (f"foreground fills {box_fill:.0%} of its {ext} mm bounding box (a brain fills about half): "
                "a box, a phantom or unmasked noise, not a skull-stripped brain"), qc
    if solidity < _MIN_SOLIDITY:
        return (f"foreground is scattered (only {solidity:.0%} of its voxels are inside the mask): noise, "
                "not a skull-stripped brain"), qc
    return None, qc


def prepare_input(path: str | Path, pcfg: Any) -> PreparedInput:
    """Load, check and preprocess one scan exactly as the run's shards were prepared.

    Args:
        path: NIfTI file (skull-stripped, any shape, voxel size and orientation).
        pcfg: the run's ``PreprocessConfig``.

    Returns:
        The :class:`PreparedInput`.

    Raises:
        FileNotFoundError, ValueError: unreadable file, not a 3D volume, or an implausible
            brain; the message is one line naming the file.
    """
    import nibabel as nib

    from brainage_hpc.ingest.preprocess import load_volume, preprocess_volume

    data, affine, name = load_volume(path)
    problem, qc = plausibility_problem(data, affine)
    if problem:
        raise ValueError(f"{name}: {problem}")
    img = nib.Nifti1Image(data, affine)
    img.set_filename(str(path))  # messages name the file; the voxels are already in memory
    volume = preprocess_volume(img, pcfg)  # (D, H, W) float16
    return PreparedInput(volume=volume, qc=qc)
