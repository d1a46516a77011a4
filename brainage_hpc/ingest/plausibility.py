"""Is this volume a brain? Size and shape checks that turn silent nonsense into one clear reason.

A model given a noise cube, a box phantom, a 32 mm volume or a whole head with
neck returns a confident, plausible age. These checks run on the skull-stripped
input (``pipeline: skullstripped``) or on the brain mask that the raw pipeline
extracted, and name what is wrong:

* no voxel > 0 at all (a skull-stripped brain has positive intensities; an
  all-negative volume is usually a raw or rescaled image);
* the bounding box of the foreground: every side between 70 and 220 mm (adult
  brains are about 140 x 175 x 140 mm; children over two years are above 100 mm);
* foreground volume between 400 and 2800 ml (adult intracranial volume is about
  1100-1900 ml; a head with skull and scalp is 3500 ml and more);
* fraction of the field of view that is foreground at most 0.9 (a skull-stripped
  brain has background around it);
* solidity: the fraction of foreground voxels whose 6 neighbours are all
  foreground, at least 0.5 (a brain is a solid object, about 0.85-0.96 here at 1-4 mm;
  thresholded noise is about 0.02);
* box fill: foreground volume / its bounding-box volume at most 0.85 (a brain fills
  about half of it, an ellipsoid 52 %; a box phantom with background around it fills
  all of it, yet passes every check above). Moved here from ``evaluation/scan_input.py``
  so that preprocessing and ``brainage predict`` share one set of checks.

The numbers were measured on nilearn's MNI152 brain, Debian's ``mricron-data``
single-subject head and brain, and the synthetic cohort (see ``tests/unit/test_plausibility.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["BOX_FILL_MAX", "EXTENT_MM", "FOREGROUND_FRACTION_MAX", "SOLIDITY_MIN", "VOLUME_ML", "BrainStats", "brain_stats",
           "implausibility"]

EXTENT_MM = (70.0, 220.0)
VOLUME_ML = (400.0, 2800.0)
FOREGROUND_FRACTION_MAX = 0.9
SOLIDITY_MIN = 0.5
BOX_FILL_MAX = 0.85


@dataclass(frozen=True)
class BrainStats:
    """Size and shape of a foreground mask.

    Attributes:
        extent_mm: (3,) bounding-box side lengths in mm along the voxel axes.
        volume_ml: foreground volume in ml.
        foreground_fraction: foreground voxels / all voxels.
        solidity: fraction of foreground voxels whose 6 neighbours are all foreground.
    """

    extent_mm: tuple[float, float, float]
    volume_ml: float
    foreground_fraction: float
    solidity: float

    def to_dict(self) -> dict[str, float]:
        """Flat QC numbers: ``extent_x_mm``... ``volume_ml``, ``foreground_fraction``, ``solidity``."""
        d = asdict(self)
        ext = d.pop("extent_mm")
        return {f"extent_{a}_mm": round(float(e), 2) for a, e in zip("xyz", ext)} | {
            k: round(float(v), 4) for k, v in d.items()
        }


def brain_stats(mask: np.ndarray, affine: np.ndarray) -> BrainStats:
    """:class:`BrainStats` of a boolean (X, Y, Z) mask with its (4, 4) voxel-to-mm affine."""
    mask = np.asarray(mask, dtype=bool)
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    n = int(mask.sum())
    if n == 0:
        return BrainStats((0.0, 0.0, 0.0), 0.0, 0.0, 0.0)
    extent = []
    for ax in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        extent.append(float((hit[-1] - hit[0] + 1) * zooms[ax]))
    inner = mask.copy()
    for ax in range(3):  # 6-neighbour erosion without scipy's per-call overhead; the border counts as background
        fwd = np.zeros_like(mask)
        bwd = np.zeros_like(mask)
        sl = [slice(None)] * 3
        sl2 = [slice(None)] * 3
        sl[ax], sl2[ax] = slice(1, None), slice(None, -1)
        fwd[tuple(sl2)] = mask[tuple(sl)]
        bwd[tuple(sl)] = mask[tuple(sl2)]
        inner &= fwd & bwd
    return BrainStats(
        extent_mm=(extent[0], extent[1], extent[2]),
        volume_ml=n * float(np.prod(zooms)) / 1000.0,
        foreground_fraction=n / mask.size,
        solidity=float(inner.sum()) / n,
    )


def implausibility(stats: BrainStats, what: str = "brain") -> str | None:
    """Why ``stats`` cannot be a brain (one phrase), or ``None`` when it is plausible.

    Args:
        stats: from :func:`brain_stats`.
        what: the noun used in the message (``"brain"``, ``"brain mask"``).
    """
    if stats.volume_ml == 0:
        return f"no {what} voxels"
    ext = "x".join(f"{e:.0f}" for e in stats.extent_mm)
    lo, hi = EXTENT_MM
    if min(stats.extent_mm) < lo:
        return f"{what} extent {ext} mm is implausibly small (expected {lo:.0f}-{hi:.0f} mm per side; wrong voxel size in the header?)"
    if max(stats.extent_mm) > hi:
        return f"{what} extent {ext} mm is implausibly large (expected {lo:.0f}-{hi:.0f} mm per side; not skull-stripped? use pipeline: raw)"
    lo, hi = VOLUME_ML
    if not lo <= stats.volume_ml <= hi:
        hint = "not skull-stripped? use pipeline: raw" if stats.volume_ml > hi else "a partial brain or wrong voxel size?"
        return f"{what} volume {stats.volume_ml:.0f} ml is implausible (expected {lo:.0f}-{hi:.0f} ml; {hint})"
    if stats.foreground_fraction > FOREGROUND_FRACTION_MAX:
        return (
            f"{stats.foreground_fraction:.0%} of the field of view is foreground (expected <= "
            f"{FOREGROUND_FRACTION_MAX:.0%}; not skull-stripped? use pipeline: raw)"
        )
    if stats.solidity < SOLIDITY_MIN:
        return f"foreground is not a solid object (solidity {stats.solidity:.2f} < {SOLIDITY_MIN}; noise or a sparse image?)"
    box_ml = float(np.prod(stats.extent_mm)) / 1000.0
    if box_ml > 0 and stats.volume_ml / box_ml > BOX_FILL_MAX:
        return (f"foreground fills {stats.volume_ml / box_ml:.0%} of its {ext} mm bounding box (a brain fills about half): "
                "a box or phantom, not a skull-stripped brain")
    return None
