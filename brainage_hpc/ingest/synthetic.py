"""A synthetic HCP-layout cohort built from the real MNI152 template in nilearn.

Why: tests, CI and the demo need T1w volumes with a *known* age effect and no
download. Each subject is the MNI152 2009 GM/WM/CSF model with

* age-dependent atrophy: cortical GM thins (lost GM becomes CSF, faster in the
  frontal lobes) and the lateral ventricles dilate,
* a sex effect on head size, a random smooth deformation, a multiplicative bias
  field and Gaussian noise,

written exactly as an HCP S1200 download looks (``<id>/T1w/...nii.gz`` plus the
unrestricted and restricted CSVs) plus a FreeSurfer-like regional table.
The same seed gives byte-identical files.

The effect sizes are exaggerated compared with biology (about 1 %/year of
cortical GM instead of 0.3 %) so a small model learns age in minutes on a CPU.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from brainage_hpc.data.ages import age_bin_label, age_to_bin
from brainage_hpc.ingest.hcp import T1W_RELPATH

__all__ = ["SynthConfig", "SubjectTruth", "REGIONS", "AGE_DEPENDENT_FEATURES", "make_cohort", "load_tissue_maps"]

_LOBES = ("frontal", "precentral", "parietal", "occipital")
_LOBE_ATROPHY = {"frontal": 1.0, "precentral": 0.6, "parietal": 0.3, "occipital": 0.0}
REGIONS: tuple[str, ...] = tuple(f"{h}_{lobe}_{z}" for h in ("lh", "rh") for lobe in _LOBES for z in ("sup", "inf"))
# Features of freesurfer.csv whose value the generator ties to age.
AGE_DEPENDENT_FEATURES: tuple[str, ...] = ("LatVent_Vol",) + tuple(
    f"{r}_{kind}" for r in REGIONS if _LOBE_ATROPHY[r.split("_")[1]] >= 0.6 for kind in ("GrayVol", "ThickAvg")
)


@dataclass(frozen=True)
class SynthConfig:
    """Options of the synthetic cohort.

    Args:
        n_subjects: number of subject folders.
        seed: master seed; subject ``i`` uses ``default_rng([seed, i])``.
        voxel_mm: isotropic voxel size in mm (2.0 keeps tests fast; 1.0 or 0.7 possible).
        shape: output (D, H, W) after centre crop/pad; ``None`` keeps the template grid.
        gm_loss_per_year: fraction of cortical GM lost per year in the fastest lobe.
        ventricle_mm_per_year: ventricle wall growth in mm per year.
        deform_mm: amplitude of the smooth random deformation in mm.
        bias_std: std of the log bias field.
        noise_std: Gaussian noise std relative to WM intensity.
        sibling_prob: probability that a subject joins the previous family.
    """

    n_subjects: int = 40
    seed: int = 0
    voxel_mm: float = 2.0
    shape: tuple[int, int, int] | None = None
    gm_loss_per_year: float = 0.012
    ventricle_mm_per_year: float = 0.35
    deform_mm: float = 2.0
    bias_std: float = 0.08
    noise_std: float = 0.03
    sibling_prob: float = 0.3
    n_noise_features: int = 16


@dataclass
class SubjectTruth:
    """Ground truth of one synthetic subject (written to truth.json)."""

    subject: str
    age: float
    age_years: int
    sex: str
    family_id: str
    head_scale: float
    atrophy_rate: float
    features: dict[str, float] = field(default_factory=dict)


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
    return _Atlas(gm, wm, csf, mask, affine, regions.astype(np.int16), vent_dist.astype(np.float32), vent, lobe_rate)


# ----------------------------------------------------------------------------- one subject


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int = 5) -> np.ndarray:
    ctrl = rng.standard_normal((n_ctrl,) * 3).astype(np.float32)
    zoom = [s / n_ctrl for s in shape]
    out = ndimage.zoom(ctrl, zoom, order=3, mode="nearest")
    return out[: shape[0], : shape[1], : shape[2]]


def _subject_volume(
    atlas: _Atlas, cfg: SynthConfig, rng: np.random.Generator, age: float, sex: str, head_scale: float, rate: float
) -> tuple[np.ndarray, dict[str, float]]:
    years = max(age - 22.0, 0.0) * rate
    # 1) atrophy: ventricles dilate, cortical GM thins (lost GM becomes CSF)
    grow = cfg.ventricle_mm_per_year * years
    vent = atlas.vent_dist_mm <= grow
    loss = np.clip(cfg.gm_loss_per_year * years * atlas.lobe_rate, 0, 0.9)
    gm = atlas.gm * (1 - loss)
    wm = atlas.wm.copy()
    gm[vent] = 0
    wm[vent] = 0
    csf = np.clip(1 - gm - wm, 0, 1) * atlas.mask
    # FreeSurfer-like measures from the subject's own tissue maps (mm^3, mm)
    vox = cfg.voxel_mm**3 * head_scale**3
    feats: dict[str, float] = {}
    feats["IntraCranial_Vol"] = float(atlas.mask.sum() * vox)
    feats["LatVent_Vol"] = float((atlas.vent_mask | vent).sum() * vox)
    feats["TotalGray_Vol"] = float(gm.sum() * vox)
    feats["CerebralWhiteMatter_Vol"] = float(wm.sum() * vox)
    for r_idx, name in enumerate(REGIONS):
        sel = atlas.regions == r_idx
        g = float(gm[sel].sum() * vox)
        w = float(atlas.wm[sel].sum() * vox)
        lobe = name.split("_")[1]
        thick = 2.7 * head_scale * (1 - cfg.gm_loss_per_year * years * _LOBE_ATROPHY[lobe])
        feats[f"{name}_GrayVol"] = g * (1 + 0.02 * rng.standard_normal())
        feats[f"{name}_ThickAvg"] = thick * (1 + 0.02 * rng.standard_normal())
        feats[f"{name}_WhiteVol"] = w * (1 + 0.03 * rng.standard_normal())
    for k in range(cfg.n_noise_features):
        feats[f"Misc_{k:02d}_Vol"] = float(1000 * (1 + 0.2 * rng.standard_normal()))
    # 2) T1w contrast: CSF dark, GM grey, WM bright
    img = (0.18 * csf + 0.55 * gm + 0.9 * wm).astype(np.float32)
    img *= atlas.mask
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
    # 4) bias field and noise, skull-stripped like HCP's *_brain file
    bias = np.exp(cfg.bias_std * _smooth_field(rng, shape, n_ctrl=4))
    img = img * bias + cfg.noise_std * rng.standard_normal(shape).astype(np.float32)
    img = np.clip(img, 0, None) * mask
    return img.astype(np.float32), feats


def _crop_or_pad(vol: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros(shape, dtype=vol.dtype)
    src, dst, shift = [], [], []
    for n_in, n_out in zip(vol.shape, shape):
        if n_in >= n_out:
            start = (n_in - n_out) // 2
            src.append(slice(start, start + n_out))
            dst.append(slice(0, n_out))
            shift.append(start)
        else:
            start = (n_out - n_in) // 2
            src.append(slice(0, n_in))
            dst.append(slice(start, start + n_in))
            shift.append(-start)
    out[tuple(dst)] = vol[tuple(src)]
    new_aff = affine.copy()
    new_aff[:3, 3] = affine[:3, :3] @ np.array(shift, dtype=float) + affine[:3, 3]
    return out, new_aff


# ----------------------------------------------------------------------------- cohort


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _csv_text(header: list[str], rows: list[list[object]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _draw_demographics(cfg: SynthConfig) -> list[tuple[str, int, float, str, str, float, float]]:
    rng = np.random.default_rng([cfg.seed, 10**6])
    out = []
    family = 0
    fam_size = 0
    fam_scale = 1.0
    for i in range(cfg.n_subjects):
        if i == 0 or fam_size >= 3 or rng.random() >= cfg.sibling_prob:
            family += 1
            fam_size = 0
            fam_scale = float(rng.normal(1.0, 0.02))
        fam_size += 1
        years = int(rng.integers(36, 38)) if rng.random() < 0.02 else int(rng.integers(22, 36))
        age = years + float(rng.random())  # biological age within the year
        sex = "M" if rng.random() < 0.45 else "F"
        head = fam_scale * (1.04 if sex == "M" else 0.97) * float(rng.normal(1.0, 0.015))
        rate = float(np.clip(rng.normal(1.0, 0.12), 0.6, 1.4))
        subject = str(100000 + 1013 * i + 206)
        out.append((subject, years, age, sex, f"F{family:05d}", head, rate))
    return out


_WORKER: dict[str, object] = {}


def _init_worker(cfg: SynthConfig) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["atlas"] = _build_atlas(cfg)


def _write_subject(job: tuple[int, str, int, float, str, str, float, float, str]) -> SubjectTruth:
    import nibabel as nib

    i, subject, years, age, sex, fam, head, rate, out = job
    cfg: SynthConfig = _WORKER["cfg"]  # type: ignore[assignment]
    atlas: _Atlas = _WORKER["atlas"]  # type: ignore[assignment]
    rng = np.random.default_rng([cfg.seed, i])
    vol, feats = _subject_volume(atlas, cfg, rng, age, sex, head, rate)
    affine = atlas.affine
    if cfg.shape is not None:
        vol, affine = _crop_or_pad(vol, affine, tuple(cfg.shape))
    data = np.round(vol * 1000.0).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    target = Path(out) / subject / T1W_RELPATH
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".tmp-" + target.name)
    nib.save(img, tmp)
    os.replace(tmp, target)
    return SubjectTruth(subject, round(age, 4), years, sex, fam, round(head, 5), round(rate, 5), feats)


def make_cohort(out_dir: str | Path, cfg: SynthConfig, progress: bool = True, workers: int = 1) -> list[SubjectTruth]:
    """Write the cohort into ``out_dir`` in the HCP S1200 layout.

    Writes ``<id>/T1w/T1w_acpc_dc_restore_brain.nii.gz`` (int16, RAS affine),
    ``unrestricted.csv`` (Subject, Gender, Age bin), ``restricted.csv``
    (Subject, Age_in_Yrs, Family_ID), ``freesurfer.csv`` (Subject + regional
    measures) and ``truth.json``. Every file is written to a temp name then
    renamed, so an interrupted run leaves no half-written volume. Output does
    not depend on ``workers``.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, *d, str(out)) for i, d in enumerate(_draw_demographics(cfg))]
    bar = tqdm(total=len(jobs), desc="synth", unit="subj", disable=not progress)
    truths: list[SubjectTruth] = []
    if workers <= 1:
        _init_worker(cfg)
        for job in jobs:
            truths.append(_write_subject(job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
            for truth in pool.map(_write_subject, jobs, chunksize=1):
                truths.append(truth)
                bar.update()
    bar.close()
    _atomic_write_text(
        out / "unrestricted.csv",
        _csv_text(["Subject", "Gender", "Age"], [[t.subject, t.sex, age_bin_label(age_to_bin(t.age_years))] for t in truths]),
    )
    _atomic_write_text(
        out / "restricted.csv",
        _csv_text(["Subject", "Age_in_Yrs", "Family_ID"], [[t.subject, t.age_years, t.family_id] for t in truths]),
    )
    feat_names = list(truths[0].features) if truths else []
    _atomic_write_text(
        out / "freesurfer.csv",
        _csv_text(["Subject"] + feat_names, [[t.subject] + [f"{t.features[k]:.4f}" for k in feat_names] for t in truths]),
    )
    meta = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "age_dependent_features": list(AGE_DEPENDENT_FEATURES),
        "subjects": [{k: v for k, v in asdict(t).items() if k != "features"} for t in truths],
    }
    _atomic_write_text(out / "truth.json", json.dumps(meta, indent=1, sort_keys=True))
    return truths
