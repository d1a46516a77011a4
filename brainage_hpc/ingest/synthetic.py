"""A synthetic HCP-layout cohort built from the real MNI152 template in nilearn.

Why: tests, CI and the demo need T1w volumes with a *known* age effect and no
download. Each subject is the MNI152 2009 GM/WM/CSF model with

* age-dependent atrophy: cortical GM thins (lost GM becomes CSF, faster in the
  frontal lobes) and the lateral ventricles dilate, at a subject-specific rate,
* a sex effect on head size, a random smooth deformation, a multiplicative bias
  field and Gaussian noise,

written exactly as an HCP S1200 download looks (``<id>/T1w/...nii.gz`` plus the
unrestricted and restricted CSVs) plus a FreeSurfer-like regional table whose
values are *measured from the written volume* (:mod:`brainage_hpc.ingest.synthetic_measure`:
tissue segmentation, affinely registered atlas labels, measurement noise), and the
generator's own voxelwise age-effect map (``truth/age_effect.nii.gz``, the truth that
explanation maps are scored against). The same seed gives byte-identical files.

Two difficulty presets (:data:`PRESETS`, ``SynthConfig.preset(name)``):

* ``default``: exaggerated atrophy (about 1 %/year of frontal GM instead of 0.3 %),
  one scanner, little anatomical variation, so a small model learns age in minutes
  on a CPU (the age signal is nearly one variable: test MAE ~1.2 y vs ~4 y for the mean);
* ``realistic``: smaller slopes, a wide spread of atrophy rates, per-subject baseline
  GM and ventricle size, larger deformations and head-size spread, and several
  "scanners" (sites) with their own contrast, noise, bias field and blur. The age
  information left in the anatomy puts the best achievable MAE near 2.3-2.5 y
  (:func:`age_information_floor`) against ~3.6 y for the mean.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from brainage_hpc.data.ages import age_bin_label, age_to_bin
from brainage_hpc.ingest.hcp import T1W_RELPATH
from brainage_hpc.ingest.synthetic_anatomy import (
    _AGE_HI,
    _AGE_LO,
    _LOBE_ATROPHY,
    REGIONS,
    _age_effect,
    _Atlas,
    _build_atlas,
    _draw_anatomy,
    _reference_volume,
    _subject_volume,
    age_information_floor,
    load_tissue_maps,
)

__all__ = [
    "AGE_DEPENDENT_FEATURES",
    "AGE_EFFECT_FILE",
    "PRESETS",
    "REFERENCE_BRAIN_FILE",
    "REGIONS",
    "SubjectTruth",
    "SynthConfig",
    "age_information_floor",
    "load_tissue_maps",
    "make_cohort",
]

# Features of freesurfer.csv whose value the generator ties to age.
AGE_DEPENDENT_FEATURES: tuple[str, ...] = ("LatVent_Vol",) + tuple(
    f"{r}_{kind}" for r in REGIONS if _LOBE_ATROPHY[r.split("_")[1]] >= 0.6 for kind in ("GrayVol", "ThickAvg")
)
AGE_EFFECT_FILE = "truth/age_effect.nii.gz"  # beside the subjects; not a subject folder (no T1w/)
REFERENCE_BRAIN_FILE = "truth/reference_brain.nii.gz"


@dataclass(frozen=True)
class SynthConfig:
    """Options of the synthetic cohort (defaults = the ``default`` preset).

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
        n_noise_features: table columns that are pure noise (``Misc_XX_Vol``).
        atrophy_rate_sd: spread of the subject's atrophy rate (1 = the cohort's slope).
        atrophy_rate_clip: (low, high) bounds of the atrophy rate.
        head_sd: spread of head size (scale factor) within a sex.
        gm_anatomy_sd: per-subject, per-lobe baseline GM deviation (fraction of GM).
        ventricle_sd_mm: per-subject baseline ventricle size deviation (mm of wall position).
        n_sites: scanners; each subject is scanned on one, drawn at random.
        site_strength: 0 = identical scanners; 1 = realistic spread of contrast
            (CSF/GM intensity), noise, bias field and blur between sites.
        preset_name: name of the preset these values came from (provenance only).
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
    atrophy_rate_sd: float = 0.12
    atrophy_rate_clip: tuple[float, float] = (0.6, 1.4)
    head_sd: float = 0.015
    gm_anatomy_sd: float = 0.0
    ventricle_sd_mm: float = 0.0
    n_sites: int = 1
    site_strength: float = 0.0
    preset_name: str = "default"

    def __post_init__(self) -> None:
        if self.n_subjects < 1:
            raise ValueError(f"SynthConfig.n_subjects must be >= 1, got {self.n_subjects}")
        if not (math.isfinite(self.voxel_mm) and self.voxel_mm > 0):
            raise ValueError(f"SynthConfig.voxel_mm must be > 0, got {self.voxel_mm}")
        if self.n_sites < 1:
            raise ValueError(f"SynthConfig.n_sites must be >= 1, got {self.n_sites}")
        for name in ("gm_loss_per_year", "ventricle_mm_per_year", "deform_mm", "bias_std", "noise_std",
                     "atrophy_rate_sd", "head_sd", "gm_anatomy_sd", "ventricle_sd_mm", "site_strength"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"SynthConfig.{name} must be a finite value >= 0, got {value}")
        lo, hi = self.atrophy_rate_clip
        if not 0 <= lo <= 1 <= hi:
            raise ValueError(f"SynthConfig.atrophy_rate_clip must satisfy 0 <= low <= 1 <= high, got {self.atrophy_rate_clip}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthConfig:
        """The named preset (:data:`PRESETS`) with ``overrides`` (e.g. ``n_subjects``, ``seed``).

        Raises:
            ValueError: unknown preset name (the valid ones are listed).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown synthetic preset '{name}'. Valid: {', '.join(PRESETS)}")
        return replace(cls(), preset_name=name, **{**PRESETS[name], **overrides})


# Differences from the defaults, per preset. ``realistic``: slopes about 2/3 of the default's,
# a 4x wider spread of atrophy rates, baseline anatomy that varies as much as ~3 years of
# atrophy, and 3 scanners. The age information floor is ~2.4 y MAE (see age_information_floor).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "realistic": {
        "gm_loss_per_year": 0.008,
        "ventricle_mm_per_year": 0.25,
        "deform_mm": 3.0,
        "atrophy_rate_sd": 0.45,
        "atrophy_rate_clip": (0.2, 1.8),
        "head_sd": 0.04,
        "gm_anatomy_sd": 0.025,
        "ventricle_sd_mm": 0.8,
        "n_sites": 3,
        "site_strength": 1.0,
    },
}


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
    site: str = "site0"
    features: dict[str, float] = field(default_factory=dict)


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


def _to_output_grid(cfg: SynthConfig, vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _crop_or_pad(vol, affine, tuple(cfg.shape)) if cfg.shape is not None else (vol, affine)


# ----------------------------------------------------------------------------- cohort


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _save_nifti(data: np.ndarray, affine: np.ndarray, target: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".tmp-" + target.name)
    nib.save(img, tmp)
    os.replace(tmp, target)


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
    lo, hi = cfg.atrophy_rate_clip
    for i in range(cfg.n_subjects):
        if i == 0 or fam_size >= 3 or rng.random() >= cfg.sibling_prob:
            family += 1
            fam_size = 0
            fam_scale = float(rng.normal(1.0, 0.02))
        fam_size += 1
        years = int(rng.integers(36, 38)) if rng.random() < 0.02 else int(rng.integers(22, 36))
        age = years + float(rng.random())  # biological age within the year
        sex = "M" if rng.random() < 0.45 else "F"
        head = fam_scale * (1.04 if sex == "M" else 0.97) * float(rng.normal(1.0, cfg.head_sd))
        rate = float(np.clip(rng.normal(1.0, cfg.atrophy_rate_sd), lo, hi))
        subject = str(100000 + 1013 * i + 206)
        out.append((subject, years, age, sex, f"F{family:05d}", head, rate))
    return out


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: SynthConfig) -> None:
    from brainage_hpc.ingest.synthetic_measure import AtlasPriors

    atlas = _build_atlas(cfg)
    max_years = (_AGE_HI - _AGE_LO) * cfg.atrophy_rate_clip[1]
    roi_mm = cfg.ventricle_mm_per_year * max_years + 4 * cfg.ventricle_sd_mm + 2 * cfg.voxel_mm
    labelled = atlas.regions >= 0
    counts = np.bincount(atlas.regions[labelled], minlength=len(REGIONS))
    gm_sums = np.bincount(atlas.regions[labelled], weights=atlas.gm[labelled], minlength=len(REGIONS))
    crop_mask, _ = _to_output_grid(cfg, atlas.mask, atlas.affine)
    priors = AtlasPriors(atlas.regions, atlas.wm, atlas.vent_mask, atlas.vent_dist_mm <= roi_mm, int(crop_mask.sum()),
                         gm_sums / np.maximum(counts, 1))
    _WORKER.update(cfg=cfg, atlas=atlas, priors=priors)


def _write_subject(job: tuple[int, str, int, float, str, str, float, float, str]) -> SubjectTruth:
    from brainage_hpc.ingest.synthetic_measure import measure_table

    i, subject, years, age, sex, fam, head, rate, out = job
    cfg: SynthConfig = _WORKER["cfg"]
    atlas: _Atlas = _WORKER["atlas"]
    rng = np.random.default_rng([cfg.seed, i])
    anatomy = _draw_anatomy(cfg, i)
    vol, draws = _subject_volume(atlas, cfg, rng, age, sex, head, rate, anatomy)
    vol, affine = _to_output_grid(cfg, vol, atlas.affine)
    data = np.round(vol * 1000.0).astype(np.int16)
    _save_nifti(data, affine, Path(out) / subject / T1W_RELPATH)
    feats = measure_table(data, cfg.voxel_mm, REGIONS, _WORKER["priors"], lambda a: _to_output_grid(cfg, a, atlas.affine)[0],
                          draws, np.random.default_rng([cfg.seed, i, 2]))
    return SubjectTruth(subject, round(age, 4), years, sex, fam, round(head, 5), round(rate, 5),
                        f"site{anatomy.site}", feats)


def _write_truth_maps(out: Path, cfg: SynthConfig) -> None:
    """``age_effect.nii.gz`` (float32, x1000 intensity units per year) and the mean-age reference brain."""
    atlas: _Atlas = _WORKER["atlas"]
    effect, affine = _to_output_grid(cfg, _age_effect(atlas, cfg), atlas.affine)
    _save_nifti(effect.astype(np.float32), affine, out / AGE_EFFECT_FILE)
    ref, _ = _to_output_grid(cfg, _reference_volume(atlas, cfg, (_AGE_LO + _AGE_HI) / 2), atlas.affine)
    _save_nifti(np.round(ref * 1000.0).astype(np.int16), affine, out / REFERENCE_BRAIN_FILE)


def make_cohort(out_dir: str | Path, cfg: SynthConfig, progress: bool = True, workers: int = 1) -> list[SubjectTruth]:
    """Write the cohort into ``out_dir`` in the HCP S1200 layout.

    Writes ``<id>/T1w/T1w_acpc_dc_restore_brain.nii.gz`` (int16, RAS affine),
    ``unrestricted.csv`` (Subject, Gender, Age bin), ``restricted.csv``
    (Subject, Age_in_Yrs, Family_ID), ``freesurfer.csv`` (Subject + regional
    measures, measured from the written volumes), ``truth/age_effect.nii.gz`` (the
    generator's voxelwise age effect on the same grid), ``truth/reference_brain.nii.gz``
    (noise-free mean-age brain on the same grid) and ``truth.json`` (config, preset,
    per-subject age, rate, head scale and site, the age information floor). Every
    file is written to a temp name then renamed, so an interrupted run leaves no
    half-written volume. Output does not depend on ``workers``.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, *d, str(out)) for i, d in enumerate(_draw_demographics(cfg))]
    bar = tqdm(total=len(jobs), desc="synth", unit="subj", disable=not progress)
    truths: list[SubjectTruth] = []
    _init_worker(cfg)
    if workers <= 1:
        for job in jobs:
            truths.append(_write_subject(job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
            for truth in pool.map(_write_subject, jobs, chunksize=1):
                truths.append(truth)
                bar.update()
    bar.close()
    _write_truth_maps(out, cfg)
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
        "preset": cfg.preset_name,
        "age_dependent_features": list(AGE_DEPENDENT_FEATURES),
        "age_information_floor_mae": round(age_information_floor(cfg), 3),
        "age_effect": {"file": AGE_EFFECT_FILE, "units": "T1w intensity (x1000 file units) per year, signed",
                       "reference": REFERENCE_BRAIN_FILE, "ages": [_AGE_LO, _AGE_HI]},
        "table": "measured from the written volumes (ingest/synthetic_measure.py)",
        "subjects": [{k: v for k, v in asdict(t).items() if k != "features"} for t in truths],
    }
    _atomic_write_text(out / "truth.json", json.dumps(meta, indent=1, sort_keys=True))
    return truths
