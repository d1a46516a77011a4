"""The synthetic cohort's FreeSurfer-like table, measured from each written volume.

Why: a table computed from the generator's noise-free tissue maps sits at the
generator's floor (a model on it reads the truth, not a measurement). Here every
number comes from the int16 volume as saved, the way an atlas-based segmentation
(SPM/FAST style) would produce it:

1. brain mask = voxels > 0 (the volume is skull-stripped);
2. registration: the atlas (tissue priors, parcellation, ventricles) brought to the
   subject by an affine (scale-only) registration, the scale estimated from the
   measured brain volume; the subject's smooth deformation is *not* undone, as an
   affine registration would not undo it;
3. bias correction (N3-like): the smooth field of WM-prior voxels (normalised
   Gaussian convolution, sigma 10 mm) divided out;
4. tissue intensities of *this* scan: WM = median over WM-prior voxels, CSF = median
   over the ventricles, GM at the nominal T1w contrast ratio between them (so a site
   whose GM/WM contrast differs gets a biased GM measure, as real pipelines do);
5. partial volumes: GM fraction per voxel with the WM fraction pinned to the prior
   (one intensity cannot separate three tissues); WM from the intensity above GM;
   CSF = the rest;
6. ``ThickAvg``: mean GM fraction inside the region's atlas footprint relative to the
   atlas's, times 2.7 mm (an area-normalised GM measure; no surface is reconstructed);
7. multiplicative measurement noise (``draws``: 2-3 % regional, 1-3 % global).

A regional measure therefore carries registration, bias-correction, contrast and
noise errors, and its age correlation is far below the generator's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["AtlasPriors", "GM_CONTRAST_RATIO", "measure_table", "register_atlas", "tissue_fractions"]

# GM intensity between CSF (0) and WM (1) of the nominal T1w contrast (0.18, 0.55, 0.9)
GM_CONTRAST_RATIO = (0.55 - 0.18) / (0.9 - 0.18)


def tissue_fractions(
    values: np.ndarray, wm_prior: np.ndarray, csf_mean: float, wm_mean: float, gm_ratio: float = GM_CONTRAST_RATIO
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSF/GM/WM fractions of brain voxels from their intensity and the registered WM prior.

    Args:
        values: intensities of the brain voxels, (N,), bias-corrected.
        wm_prior: the atlas WM probability at those voxels, (N,).
        csf_mean: CSF intensity of this scan.
        wm_mean: WM intensity of this scan.
        gm_ratio: GM intensity as a fraction of the way from CSF to WM.

    Returns:
        (csf (N,), gm (N,), wm (N,)) fractions in [0, 1] summing to 1.

    Example:
        >>> csf, gm, wm = tissue_fractions(np.array([180.0, 550.0, 900.0, 725.0]), np.array([0, 0, 1, 0.5]), 180, 900, 0.514)
        >>> gm.round(2).tolist(), wm.round(2).tolist()
        [[0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.5]]
    """
    v = np.asarray(values, dtype=np.float64)
    prior = np.clip(np.asarray(wm_prior, dtype=np.float64), 0, 1)
    c, w = float(csf_mean), float(wm_mean)
    g = c + gm_ratio * (w - c)
    wm = np.clip((v - g) / max(w - g, 1e-6), 0, 1)
    gm = np.clip((v - c - (w - c) * prior) / max(g - c, 1e-6), 0, 1)
    gm = np.minimum(gm, 1 - wm)
    return 1 - gm - wm, gm, wm


def _bias_corrected(vals: np.ndarray, brain: np.ndarray, wm_prior: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Divide out the smooth intensity field of the WM-prior voxels (normalised convolution, 10 mm)."""
    wmask = (brain & (wm_prior > 0.9)).astype(np.float32)
    if wmask.sum() < 50:
        return vals
    sigma = 10.0 / voxel_mm
    field = ndimage.gaussian_filter(vals * wmask, sigma) / np.maximum(ndimage.gaussian_filter(wmask, sigma), 1e-3)
    level = float(np.median(vals[wmask > 0]))
    return np.where(brain, vals * level / np.maximum(field, 1e-3 * level), 0.0).astype(np.float32)


@dataclass(frozen=True)
class AtlasPriors:
    """What the measuring pipeline knows: the template's priors on the template grid.

    Attributes:
        regions: (X, Y, Z) int16 parcellation labels 0..R-1 (-1 = none).
        wm: (X, Y, Z) WM probability.
        ventricles: (X, Y, Z) bool lateral ventricles (pure CSF).
        vent_roi: (X, Y, Z) bool search region of the ventricle volume.
        brain_voxels: brain voxels of the template inside the output crop (for the scale).
        gm_fraction: (R,) mean GM probability inside each region's footprint.
    """

    regions: np.ndarray
    wm: np.ndarray
    ventricles: np.ndarray
    vent_roi: np.ndarray
    brain_voxels: int
    gm_fraction: np.ndarray


def register_atlas(
    atlas: AtlasPriors, scale: float, crop: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The atlas scaled about the grid centre (affine, scale only), then cropped like the volume.

    Args:
        atlas: priors on the template grid.
        scale: subject size / template size.
        crop: the crop/pad applied to the written volume.

    Returns:
        (labels int16, WM prior float32, ventricles bool, ventricle ROI bool) on the volume's grid.
    """
    shape = atlas.regions.shape
    centre = (np.array(shape) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32)
    coords = np.stack([centre[a] + (grid[a] - centre[a]) / scale for a in range(3)])

    def warp(a: np.ndarray, order: int, cval: float = 0.0) -> np.ndarray:
        return ndimage.map_coordinates(a.astype(np.float32), coords, order=order, mode="constant", cval=cval)

    labels = crop(warp(atlas.regions, 0, -1.0).astype(np.int16))
    return labels, crop(warp(atlas.wm, 1)), crop(warp(atlas.ventricles, 0) > 0.5), crop(warp(atlas.vent_roi, 0) > 0.5)


def measure_table(
    data: np.ndarray,
    voxel_mm: float,
    region_names: tuple[str, ...],
    atlas: AtlasPriors,
    crop: Callable[[np.ndarray], np.ndarray],
    draws: dict[str, float],
    rng: np.random.Generator,
) -> dict[str, float]:
    """FreeSurfer-like measures (mm^3, mm) of one written volume.

    Args:
        data: (D, H, W) the volume as saved (int16 values, background 0).
        voxel_mm: voxel size of the saved volume.
        region_names: names of the atlas labels 0..R-1.
        atlas: the template's priors (see :class:`AtlasPriors`).
        crop: the crop/pad applied to the written volume.
        draws: ``{column: noise factor}`` of the regional columns, plus ``Misc_*`` values.
        rng: stream of the global columns' measurement noise.

    Returns:
        ``{column: value}`` in the table's column order (NaN when the crop holds no brain).
    """
    vals = np.asarray(data, dtype=np.float32)
    brain = vals > 0
    vox = float(voxel_mm) ** 3
    n_brain = int(brain.sum())
    if n_brain < 100:  # nothing to segment: an all-background crop
        return {k: float("nan") for k in _columns(region_names, draws)}
    scale = (n_brain / max(atlas.brain_voxels, 1)) ** (1 / 3)
    labels, wm_prior, ventricles, vent_roi = register_atlas(atlas, scale, crop)
    vals = _bias_corrected(vals, brain, wm_prior, voxel_mm)
    wm_sel = brain & (wm_prior > 0.9)
    wm_mean = float(np.median(vals[wm_sel])) if wm_sel.any() else float(np.percentile(vals[brain], 95))
    csf_sel = brain & ventricles
    csf_mean = float(np.median(vals[csf_sel])) if csf_sel.sum() >= 5 else float(np.percentile(vals[brain], 2))
    csf, gm, wm = tissue_fractions(vals[brain], wm_prior[brain], csf_mean, wm_mean)
    fr = {k: np.zeros(vals.shape, dtype=np.float32) for k in ("csf", "gm", "wm")}
    fr["csf"][brain], fr["gm"][brain], fr["wm"][brain] = csf, gm, wm
    feats: dict[str, float] = {
        "IntraCranial_Vol": n_brain * vox * (1 + 0.01 * rng.standard_normal()),
        "LatVent_Vol": float(fr["csf"][vent_roi & brain].sum()) * vox * (1 + 0.03 * rng.standard_normal()),
        "TotalGray_Vol": float(gm.sum()) * vox * (1 + 0.015 * rng.standard_normal()),
        "CerebralWhiteMatter_Vol": float(wm.sum()) * vox * (1 + 0.015 * rng.standard_normal()),
    }
    index = labels.ravel()
    ok = index >= 0
    n_r = len(region_names)
    count = np.bincount(index[ok], minlength=n_r)[:n_r].astype(np.float64)
    gm_sum = np.bincount(index[ok], weights=fr["gm"].ravel()[ok], minlength=n_r)[:n_r]
    wm_sum = np.bincount(index[ok], weights=fr["wm"].ravel()[ok], minlength=n_r)[:n_r]
    for r, name in enumerate(region_names):
        frac = gm_sum[r] / count[r] if count[r] else float("nan")
        feats[f"{name}_GrayVol"] = gm_sum[r] * vox * draws[f"{name}_GrayVol"]
        feats[f"{name}_ThickAvg"] = 2.7 * frac / max(float(atlas.gm_fraction[r]), 1e-6) * draws[f"{name}_ThickAvg"]
        feats[f"{name}_WhiteVol"] = wm_sum[r] * vox * draws[f"{name}_WhiteVol"]
    for k, v in draws.items():
        if k.startswith("Misc_"):
            feats[k] = v
    return {k: float(v) for k, v in feats.items()}


def _columns(region_names: tuple[str, ...], draws: dict[str, float]) -> list[str]:
    cols = ["IntraCranial_Vol", "LatVent_Vol", "TotalGray_Vol", "CerebralWhiteMatter_Vol"]
    cols += [f"{n}_{kind}" for n in region_names for kind in ("GrayVol", "ThickAvg", "WhiteVol")]
    return cols + [k for k in draws if k.startswith("Misc_")]
