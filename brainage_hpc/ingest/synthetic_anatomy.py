"""The synthetic cohort's anatomy: the MNI152 tissue model, atrophy, scanners, one subject's volume.

Split from :mod:`brainage_hpc.ingest.synthetic` (which writes the cohort). Random
numbers: subject ``i`` draws its deformation, bias field and noise from
``default_rng([seed, i])`` in a fixed order, and the ``realistic`` preset's extra
anatomy and site from ``default_rng([seed, i, 1])``, so the ``default`` preset's
volumes are byte-identical to earlier versions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from brainage_hpc.ingest.synthetic import SynthConfig

__all__ = ["REGIONS", "age_information_floor", "load_tissue_maps"]

_LOBES = ("frontal", "precentral", "parietal", "occipital")
_LOBE_ATROPHY = {"frontal": 1.0, "precentral": 0.6, "parietal": 0.3, "occipital": 0.0}
REGIONS: tuple[str, ...] = tuple(f"{h}_{lobe}_{z}" for h in ("lh", "rh") for lobe in _LOBES for z in ("sup", "inf"))
_AGE_LO, _AGE_HI = 22.0, 37.0  # the cohort's age range (years)
_CONTRAST = (0.18, 0.55, 0.9)  # T1w intensity of CSF, GM, WM (relative to WM ~ 0.9)


# ----------------------------------------------------------------------------- tissue model


def load_tissue_maps(voxel_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, CSF probabilities, brain mask and affine of MNI152 2009 at ``voxel_mm``.

    Uses nilearn's bundled templates (no download): resolution 1 or 2 directly,
    any other voxel size by linear resampling of the 1 mm maps.
    """
    from nilearn import datasets

    native = 2 if abs(voxel_mm - 2.0) < 1e-6 else 1
    gm_img = datasets.load_mni152_gm_template(resolution=native)
    wm_img = datasets.load_mni152_wm_template(resolution=native)
    mask_img = datasets.load_mni152_brain_mask(resolution=native)
    gm = np.asarray(gm_img.get_fdata(), dtype=np.float32)
    wm = np.asarray(wm_img.get_fdata(), dtype=np.float32)
    mask = np.asarray(mask_img.get_fdata(), dtype=np.float32)
    affine = np.array(gm_img.affine, dtype=np.float64)
    if native != voxel_mm:
        zoom = native / voxel_mm
        gm, wm, mask = (ndimage.zoom(a, zoom, order=1) for a in (gm, wm, mask))
        affine = affine.copy()
        affine[:3, :3] = np.diag([voxel_mm] * 3)
    mask = (mask > 0.5) | (gm + wm > 0.3)
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(1.0 - gm - wm, 0, 1) * mask
    return gm, wm, csf, mask.astype(bool), affine


@dataclass
class _Atlas:
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    regions: np.ndarray  # int labels 0..len(REGIONS)-1 on cortical GM, -1 elsewhere
    vent_dist_mm: np.ndarray  # distance (mm) to the lateral ventricles
    vent_mask: np.ndarray
    lobe_rate: np.ndarray  # per-voxel atrophy weight of its lobe
    lobe_idx: np.ndarray  # per-voxel lobe index 0..3 (frontal..occipital)


def _build_atlas(cfg: SynthConfig) -> _Atlas:
    gm, wm, csf, mask, affine = load_tissue_maps(cfg.voxel_mm)
    ijk = np.indices(gm.shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *gm.shape)  # mm, RAS
    # lateral ventricles: CSF-rich voxels deep inside the brain, near the midline.
    depth = ndimage.distance_transform_edt(mask) * cfg.voxel_mm
    vent = (csf > 0.6) & (depth > 18) & (np.abs(xyz[0]) < 25) & (np.abs(xyz[1] + 10) < 40) & (xyz[2] > -5)
    vent = ndimage.binary_opening(vent, iterations=1) if vent.sum() > 50 else vent
    if vent.sum() == 0:  # defensive: very coarse grids
        centre = tuple(int(c) for c in ndimage.center_of_mass(mask))
        vent = np.zeros_like(mask)
        vent[centre] = True
    vent_dist = ndimage.distance_transform_edt(~vent) * cfg.voxel_mm
    # pseudo-parcellation: hemisphere x AP quartile x superior/inferior
    ys = xyz[1][mask]
    q = np.quantile(ys, [0.25, 0.5, 0.75])
    lobe_idx = 3 - np.digitize(xyz[1], q)  # anterior (large y) -> 0 = frontal
    zmid = np.median(xyz[2][mask])
    sup = (xyz[2] < zmid).astype(int)  # 0: sup, 1: inf
    hemi = (xyz[0] >= 0).astype(int)  # 0: lh (x<0), 1: rh
    regions = hemi * 8 + lobe_idx * 2 + sup
    regions = np.where(gm > 0.05, regions, -1)
    lobe_rate = np.vectorize(lambda i: _LOBE_ATROPHY[_LOBES[i]])(lobe_idx).astype(np.float32)
    return _Atlas(gm, wm, csf, mask, affine, regions.astype(np.int16), vent_dist.astype(np.float32), vent, lobe_rate,
                  lobe_idx.astype(np.int8))


# ----------------------------------------------------------------------------- one subject


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int = 5) -> np.ndarray:
    ctrl = rng.standard_normal((n_ctrl,) * 3).astype(np.float32)
    zoom = [s / n_ctrl for s in shape]
    out = ndimage.zoom(ctrl, zoom, order=3, mode="nearest")
    return out[: shape[0], : shape[1], : shape[2]]


@dataclass(frozen=True)
class _Scanner:
    """Acquisition of one site: tissue contrast, noise and bias-field scale, blur (voxels)."""

    contrast: tuple[float, float, float] = _CONTRAST
    noise_scale: float = 1.0
    bias_scale: float = 1.0
    blur_vox: float = 0.0


def _site_scanner(cfg: SynthConfig, site: int) -> _Scanner:
    """Site 0 of a one-site cohort is the plain scanner; others are drawn from the seed."""
    if cfg.n_sites <= 1 or cfg.site_strength == 0:
        return _Scanner()
    u = np.random.default_rng([cfg.seed, 10**6 + 7, site]).uniform(-1.0, 1.0, 5)
    k = cfg.site_strength
    csf, gm, wm = _CONTRAST
    return _Scanner(
        contrast=(csf + 0.07 * k * u[0], gm + 0.05 * k * u[1], wm),
        noise_scale=float(np.exp(0.6 * k * u[2])),
        bias_scale=1.0 + 0.8 * k * (u[3] + 1) / 2,
        blur_vox=0.6 * k * (u[4] + 1) / 2,
    )


@dataclass(frozen=True)
class _Anatomy:
    """A subject's baseline anatomy: per-lobe GM deviation (fraction) and ventricle wall offset (mm)."""

    gm_lobe: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    ventricle_mm: float = 0.0
    site: int = 0


def _draw_anatomy(cfg: SynthConfig, i: int) -> _Anatomy:
    """From its own stream ``[seed, i, 1]``, so the default preset's volumes do not change."""
    if cfg.gm_anatomy_sd == 0 and cfg.ventricle_sd_mm == 0 and cfg.n_sites <= 1:
        return _Anatomy()
    rng = np.random.default_rng([cfg.seed, i, 1])
    gm = tuple(float(v) for v in cfg.gm_anatomy_sd * rng.standard_normal(4))
    vent = float(cfg.ventricle_sd_mm * rng.standard_normal())
    site = int(rng.integers(cfg.n_sites)) if cfg.n_sites > 1 else 0
    return _Anatomy(gm, vent, site)  # type: ignore[arg-type]


def _tissues(
    atlas: _Atlas, cfg: SynthConfig, years: float, anatomy: _Anatomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, CSF fractions after ``years`` of atrophy (rate-scaled) on the template grid."""
    grow = cfg.ventricle_mm_per_year * years
    if cfg.ventricle_sd_mm > 0:  # baseline size varies around a mean offset, never below the atlas
        grow = max(grow + 2 * cfg.ventricle_sd_mm + anatomy.ventricle_mm, 0.0)
    vent = atlas.vent_dist_mm <= grow
    loss = cfg.gm_loss_per_year * years * atlas.lobe_rate
    if cfg.gm_anatomy_sd > 0:
        loss = np.clip(loss + np.asarray(anatomy.gm_lobe, dtype=np.float32)[atlas.lobe_idx], -0.3, 0.9)
    else:
        loss = np.clip(loss, 0, 0.9)
    gm = atlas.gm * (1 - loss)
    wm = atlas.wm.copy()
    if cfg.gm_anatomy_sd > 0:
        gm = np.minimum(gm, 1 - wm)
    gm[vent] = 0
    wm[vent] = 0
    csf = np.clip(1 - gm - wm, 0, 1) * atlas.mask
    return gm, wm, csf


def _t1w(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, mask: np.ndarray, contrast: tuple[float, float, float]) -> np.ndarray:
    """T1w contrast: CSF dark, GM grey, WM bright; zero outside the brain."""
    c_csf, c_gm, c_wm = contrast
    img = (c_csf * csf + c_gm * gm + c_wm * wm).astype(np.float32)
    img *= mask
    return img


def _subject_volume(
    atlas: _Atlas, cfg: SynthConfig, rng: np.random.Generator, age: float, sex: str, head_scale: float, rate: float,
    anatomy: _Anatomy | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """One subject's volume on the template grid, and the table's noise draws.

    The table's noise factors are drawn first, in the order the table was once computed
    in, so that the default preset's volumes stay byte-identical across versions.

    Returns:
        (volume (X, Y, Z) float32, ``{feature: multiplicative measurement noise factor}``
        for the regional columns, plus the ``Misc_XX_Vol`` noise columns themselves).
    """
    anatomy = anatomy or _Anatomy()
    scanner = _site_scanner(cfg, anatomy.site)
    years = max(age - _AGE_LO, 0.0) * rate
    # 1) atrophy: ventricles dilate, cortical GM thins (lost GM becomes CSF)
    gm, wm, csf = _tissues(atlas, cfg, years, anatomy)
    # measurement noise of the regional table columns (applied to the measured values later)
    draws: dict[str, float] = {}
    for name in REGIONS:
        draws[f"{name}_GrayVol"] = 1 + 0.02 * rng.standard_normal()
        draws[f"{name}_ThickAvg"] = 1 + 0.02 * rng.standard_normal()
        draws[f"{name}_WhiteVol"] = 1 + 0.03 * rng.standard_normal()
    for k in range(cfg.n_noise_features):
        draws[f"Misc_{k:02d}_Vol"] = float(1000 * (1 + 0.2 * rng.standard_normal()))
    # 2) T1w contrast
    img = _t1w(gm, wm, csf, atlas.mask, scanner.contrast)
    # 3) head size and a smooth deformation, applied by one resampling
    shape = img.shape
    centre = (np.array(shape) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32)
    amp = cfg.deform_mm / cfg.voxel_mm
    coords = np.empty_like(grid)
    for ax in range(3):
        disp = _smooth_field(rng, shape) * amp
        coords[ax] = centre[ax] + (grid[ax] - centre[ax]) / head_scale + disp
    img = ndimage.map_coordinates(img, coords, order=1, mode="constant", cval=0.0)
    mask = ndimage.map_coordinates(atlas.mask.astype(np.float32), coords, order=1, cval=0.0) > 0.5
    if scanner.blur_vox > 0:  # the scanner's point-spread function
        img = ndimage.gaussian_filter(img, scanner.blur_vox)
    # 4) bias field and noise, skull-stripped like HCP's *_brain file
    bias = np.exp(cfg.bias_std * scanner.bias_scale * _smooth_field(rng, shape, n_ctrl=4))
    img = img * bias + cfg.noise_std * scanner.noise_scale * rng.standard_normal(shape).astype(np.float32)
    img = np.clip(img, 0, None) * mask
    return img.astype(np.float32), draws


def _reference_volume(atlas: _Atlas, cfg: SynthConfig, age: float) -> np.ndarray:
    """Noise-free, undeformed brain of the cohort's mean anatomy at ``age`` (template grid)."""
    gm, wm, csf = _tissues(atlas, cfg, max(age - _AGE_LO, 0.0), _Anatomy())
    return _t1w(gm, wm, csf, atlas.mask, _CONTRAST)


def _age_effect(atlas: _Atlas, cfg: SynthConfig) -> np.ndarray:
    """The generator's voxelwise age effect: mean T1w change per year over 22-37 y (x1000 units, signed).

    Computed for the cohort's mean anatomy and rate 1 on the template grid; the ground
    truth that explanation maps are scored against (``|effect|``: where age changes the image).
    """
    old, young = _reference_volume(atlas, cfg, _AGE_HI), _reference_volume(atlas, cfg, _AGE_LO)
    return ((old - young) * 1000.0 / (_AGE_HI - _AGE_LO)).astype(np.float32)


def age_information_floor(cfg: SynthConfig, n: int = 200_000, seed: int = 0) -> float:
    """MAE (years) of the best estimator of age from the cohort's atrophy alone (Monte Carlo).

    What a model can at best read from an image is the subject's atrophy
    ``(age - 22) * rate`` blurred by baseline anatomy; with the generator's own age,
    rate and anatomy distributions, the posterior median of age given that signal
    has this MAE. It ignores noise, bias, sites and deformation (which only make it
    worse), so it is a floor: no model on this cohort beats it in expectation.

    Example:
        >>> from brainage_hpc.ingest.synthetic import SynthConfig
        >>> round(age_information_floor(SynthConfig(), n=20000), 1) < 1.0
        True
    """
    rng = np.random.default_rng(seed)
    years = np.where(rng.random(n) < 0.02, rng.integers(36, 38, n), rng.integers(22, 36, n))
    age = years + rng.random(n)
    lo, hi = cfg.atrophy_rate_clip
    rate = np.clip(rng.normal(1.0, cfg.atrophy_rate_sd, n), lo, hi)
    signal = (age - _AGE_LO) * rate
    # baseline anatomy in years of atrophy: GM (4 lobes, weights 1/.6/.3/0) and ventricles, averaged
    noise_var = []
    if cfg.gm_anatomy_sd > 0 and cfg.gm_loss_per_year > 0:
        w = np.array([_LOBE_ATROPHY[lobe] for lobe in _LOBES])
        noise_var.append((cfg.gm_anatomy_sd / cfg.gm_loss_per_year) ** 2 / float((w**2).sum()))
    if cfg.ventricle_sd_mm > 0 and cfg.ventricle_mm_per_year > 0:
        noise_var.append((cfg.ventricle_sd_mm / cfg.ventricle_mm_per_year) ** 2)
    if noise_var:  # inverse-variance combination of the independent channels
        signal = signal + rng.normal(0.0, math.sqrt(1.0 / sum(1.0 / v for v in noise_var)), n)
    edges = np.quantile(signal, np.linspace(0, 1, 401))
    idx = np.clip(np.searchsorted(edges, signal, side="right") - 1, 0, 399)
    order = np.argsort(idx, kind="stable")
    pred = np.empty(n)
    for chunk in np.split(order, np.flatnonzero(np.diff(idx[order])) + 1):
        pred[chunk] = np.median(age[chunk])
    return float(np.abs(pred - age).mean())
