"""Per-subject preprocessing: one T1w NIfTI -> one float16 (D, H, W) volume.

The same :func:`preprocess_volume` runs when building shards and in
``brainage predict`` on raw NIfTI files of any shape and voxel size, so a model
always sees inputs prepared the same way. Steps, in order:

1. load with nibabel (a ``.nii.gz`` is decompressed in memory first, so a bad gzip
   CRC is an error, not 18 % garbage voxels) and check the volume (3D, finite, not
   all zero, some voxels > 0, a plausible brain size and shape:
   :mod:`brainage_hpc.ingest.plausibility`);
2. reorient to canonical RAS (``monai.transforms.Orientation``);
3. crop to the brain bounding box plus a margin (``CropForeground``; the input
   is skull-stripped, so the brain is every voxel > 0);
4. resample once, straight onto the target grid: ``voxel_mm`` isotropic, ``shape``
   voxels, centred on the bounding box (``SpatialResample``). This is resample
   then centre crop/pad done in one interpolation, which is 2-3x faster than
   ``Spacing`` followed by ``ResizeWithPadOrCrop`` and gives the same grid;
5. intensity normalisation inside the brain mask: robust z-score (clip to
   percentiles, then mean 0 / std 1), or Nyul histogram standardisation with
   landmarks fitted on the training split (:func:`landmarks_from_percentiles`);
6. float16.

The intensity step is plain NumPy: MONAI's ``NormalizeIntensity(nonzero=True)``
computes the same mean/std but is about 20x slower on CPU, and its percentile
clipping (``ClipIntensityPercentiles``) cannot be restricted to the brain mask.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import hashlib
import itertools
import json
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "INTENSITY_MODES",
    "PIPELINES",
    "PreprocessConfig",
    "apply_landmarks",
    "fit_histogram_landmarks",
    "landmarks_from_percentiles",
    "check_skullstripped",
    "load_volume",
    "contrast_index",
    "prepare_volume",
    "preprocess_volume",
    "read_nifti",
    "reference_affine",
    "subject_percentiles",
]

INTENSITY_MODES = ("zscore", "histogram")
PIPELINES = ("skullstripped", "raw")
# keys added after shards of format 1 existed: left out of config_hash() while at their default,
# so shard sets made before them keep their hash and stay readable
_LATE_KEYS_DEFAULTS: dict[str, Any] = {"pipeline": "skullstripped"}
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessConfig:
    """Deterministic preprocessing of one T1w volume; its hash is stored in every shard.

    Args:
        shape: output grid (D, H, W) in voxels, RAS order. Seed: 128^3; SFCN: 160x192x160.
        voxel_mm: isotropic output voxel size in mm (HCP input is 0.7 mm). Note that a
            whole adult brain is about 140x175x140 mm, so 128^3 at 1 mm crops it a little.
        intensity: ``"zscore"`` (robust z-score in the brain mask) or ``"histogram"``
            (Nyul standardisation; needs ``landmarks``).
        crop_margin_mm: margin kept around the brain bounding box, in mm.
        clip_percentiles: (low, high) percentiles of brain intensities clipped before
            z-scoring.
        interpolation: resampling mode, ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
        landmark_percentiles: brain-intensity percentiles used as histogram landmarks.
        landmarks: standard-scale landmark values (same length as ``landmark_percentiles``),
            fitted on the training split; ``None`` until fitted.
        pipeline: ``"skullstripped"`` (HCP's ``*_brain`` files: background exactly 0) or
            ``"raw"`` (scanner T1w with skull: N4, MNI registration, brain extraction first;
            :mod:`brainage_hpc.ingest.raw`).
    """

    shape: tuple[int, int, int] = (128, 128, 128)
    voxel_mm: float = 1.0
    intensity: Literal["zscore", "histogram"] = "zscore"
    crop_margin_mm: float = 2.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    landmark_percentiles: tuple[float, ...] = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
    landmarks: tuple[float, ...] | None = None
    pipeline: Literal["skullstripped", "raw"] = "skullstripped"

    def __post_init__(self) -> None:
        _check_option("pipeline", self.pipeline, PIPELINES)
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"PreprocessConfig.shape must be 3 positive integers (D, H, W), got {self.shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "voxel_mm", float(self.voxel_mm))
        if not (math.isfinite(self.voxel_mm) and self.voxel_mm > 0):
            raise ValueError(f"PreprocessConfig.voxel_mm must be > 0, got {self.voxel_mm}")
        _check_option("intensity", self.intensity, INTENSITY_MODES)
        _check_option("interpolation", self.interpolation, ("bilinear", "nearest"))
        if not self.crop_margin_mm >= 0:
            raise ValueError(f"PreprocessConfig.crop_margin_mm must be >= 0, got {self.crop_margin_mm}")
        object.__setattr__(self, "crop_margin_mm", float(self.crop_margin_mm))
        lo, hi = (float(p) for p in self.clip_percentiles)
        if not 0 <= lo < hi <= 100:
            raise ValueError(
                f"PreprocessConfig.clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}"
            )
        object.__setattr__(self, "clip_percentiles", (lo, hi))
        pcts = tuple(float(p) for p in self.landmark_percentiles)
        if len(pcts) < 2 or any(b <= a for a, b in itertools.pairwise(pcts)) or pcts[0] < 0 or pcts[-1] > 100:
            raise ValueError(
                f"PreprocessConfig.landmark_percentiles must be >= 2 increasing values in [0, 100], got {pcts}"
            )
        object.__setattr__(self, "landmark_percentiles", pcts)
        if self.landmarks is not None:
            marks = tuple(float(v) for v in self.landmarks)
            if len(marks) != len(pcts) or any(b < a for a, b in itertools.pairwise(marks)):
                raise ValueError(
                    f"PreprocessConfig.landmarks must be {len(pcts)} non-decreasing values "
                    f"(one per landmark percentile), got {self.landmarks}"
                )
            object.__setattr__(self, "landmarks", marks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); inverse of :meth:`from_dict`."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Build from :meth:`to_dict` output (e.g. a manifest's ``preprocess``).

        Raises:
            ValueError: an unknown key (with the valid ones) or an invalid value.
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in valid]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], valid, n=1)
            did = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ValueError(f"unknown preprocess key(s) {', '.join(unknown)}.{did} Valid: {', '.join(valid)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**kwargs)  # type: ignore[arg-type]  # values are checked in __post_init__

    def config_hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of :meth:`to_dict` (stable across runs)."""
        d = {k: v for k, v in self.to_dict().items() if not (k in _LATE_KEYS_DEFAULTS and v == _LATE_KEYS_DEFAULTS[k])}
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_option(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        hint = difflib.get_close_matches(str(value), options, n=1)
        did = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ValueError(f"PreprocessConfig.{name}={value!r} is not valid.{did} Valid: {', '.join(options)}")


def reference_affine(cfg: PreprocessConfig) -> np.ndarray:
    """Nominal RAS affine (4, 4) of the output grid: ``voxel_mm`` spacing, origin at the grid centre.

    Each subject's grid is centred on its own brain bounding box, so this is the
    affine to write NIfTI maps (Grad-CAM, generated brains) in, not a scanner position.
    """
    v = cfg.voxel_mm
    aff = np.diag([v, v, v, 1.0])
    aff[:3, 3] = -v * (np.asarray(cfg.shape, dtype=float) - 1) / 2
    return aff


def read_nifti(path: str | Path) -> Any:
    """Open a NIfTI file; a gzipped one is decompressed in memory with its CRC and length checked.

    nibabel reads a ``.nii.gz`` whose compressed bytes were damaged (a bad gzip
    CRC) without an error and returns partly garbage voxels; Python's ``gzip``
    verifies the CRC-32 and size stored at the end of every gzip member.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: bad gzip CRC or stream, truncated file, unreadable header (message starts with the path).
    """
    import nibabel as nib

    name = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: no such file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
            if magic != b"\x1f\x8b":
                return nib.load(name)
            fh.seek(0)
            raw = fh.read()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise ValueError(f"{name}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from exc
    try:
        raw = gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        detail = "bad gzip CRC" if "CRC" in str(exc) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{name}: gzip data truncated or corrupt ({detail}); copy or download the file again") from exc
    try:
        sizeof_hdr = int.from_bytes(raw[:4], "little")
        kind = nib.Nifti2Image if sizeof_hdr in (540, 540 << 24) else nib.Nifti1Image
        return kind.from_bytes(raw)
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise ValueError(f"{name}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from exc


def load_volume(img: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """Load and check one T1w volume.

    Args:
        img: a path (``str``/``Path``) or a nibabel spatial image.

    Returns:
        (data (X, Y, Z) float32 in file voxel order, affine (4, 4) float64, name for messages).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unreadable or truncated file, bad gzip CRC, not 3D, non-finite voxels,
            all zeros, constant.
    """
    name = str(img) if isinstance(img, (str, Path)) else str(getattr(img, "get_filename", lambda: None)() or "<image>")
    if isinstance(img, (str, Path)):
        img = read_nifti(img)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ValueError(f"{name}: is {len(img.shape)}D with shape {tuple(img.shape)}; expected one 3D T1w volume")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:  # truncated gzip: EOFError, zlib.error, OSError...
        raise ValueError(
            f"{name}: cannot read voxel data, file truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise ValueError(f"{name}: has {n_bad} NaN/Inf voxels")
    if not np.any(data):
        raise ValueError(f"{name}: is all zeros (no brain voxels)")
    brain = data[data != 0]
    if brain.min() == brain.max():
        raise ValueError(f"{name}: brain intensity is constant ({brain[0]:g}); a mask, not a T1w image?")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{name}: has an invalid (singular or non-finite) affine")
    return data, affine, name


def check_skullstripped(data: np.ndarray, affine: np.ndarray, name: str) -> dict[str, float]:
    """Check that a skull-stripped input looks like a brain; return its size/shape QC numbers.

    Raises:
        ValueError: no voxel > 0, or an implausible extent, volume, foreground fraction
            or shape (see :mod:`brainage_hpc.ingest.plausibility`); the message starts with ``name``.
    """
    from brainage_hpc.ingest.plausibility import brain_stats, implausibility

    fg = data > 0
    if not fg.any():
        raise ValueError(f"{name}: no voxels > 0 (not skull-stripped?)")
    stats = brain_stats(fg, affine)
    problem = implausibility(stats)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return stats.to_dict()


def _geometry(data: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig, centre_mm: np.ndarray | None = None) -> np.ndarray:
    """RAS reorientation, brain crop and one resampling onto the target grid -> (D, H, W) float32.

    ``centre_mm`` fixes the grid centre (raw pipeline: the template's brain, so every
    registered scan lands on the same MNI grid) instead of the brain bounding box's centre.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation, SpatialResample

    x: Any = MetaTensor(torch.from_numpy(data[None]), affine=torch.as_tensor(affine, dtype=torch.float64))
    x = Orientation(axcodes="RAS", labels=_RAS_LABELS)(x)
    spacing = np.sqrt((np.asarray(x.affine)[:3, :3] ** 2).sum(axis=0))
    margin = [math.ceil(cfg.crop_margin_mm / s) for s in spacing]
    if centre_mm is None:
        x = CropForeground(select_fn=_is_foreground, margin=margin, allow_smaller=True)(x)
        src = np.asarray(x.affine, dtype=np.float64)
        centre = src[:3, :3] @ ((np.asarray(x.shape[1:], dtype=float) - 1) / 2) + src[:3, 3]  # mm, RAS
    else:
        centre = np.asarray(centre_mm, dtype=np.float64)
    dst = np.diag([cfg.voxel_mm] * 3 + [1.0])
    dst[:3, 3] = centre - cfg.voxel_mm * (np.asarray(cfg.shape, dtype=float) - 1) / 2
    resample = SpatialResample(mode=cfg.interpolation, padding_mode="zeros", dtype=torch.float32)  # type: ignore[arg-type]
    out = resample(x, dst_affine=torch.as_tensor(dst), spatial_size=cfg.shape)
    return np.asarray(out.array if hasattr(out, "array") else out, dtype=np.float32)[0]  # (D, H, W)


def _is_foreground(x: Any) -> Any:
    return x > 0


def _brain_values(vol: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mask = vol > 0
    if not mask.any():
        raise ValueError(f"{name}: no brain voxels inside the target grid (check the affine and voxel size)")
    return mask, vol[mask]


def _zscore(vol: np.ndarray, cfg: PreprocessConfig, name: str) -> np.ndarray:
    mask, vals = _brain_values(vol, name)
    lo, hi = np.percentile(vals, cfg.clip_percentiles)
    vals = np.clip(vals, lo, hi)
    mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
    if not std > 1e-6 * max(abs(mean), 1.0):
        raise ValueError(f"{name}: brain intensity is constant ({mean:g}); cannot z-score")
    out = np.zeros_like(vol)
    out[mask] = (vals - mean) / std
    return out


def apply_landmarks(vals: np.ndarray, pcts: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Piecewise-linear map of intensities from subject percentiles to standard landmarks.

    Values beyond the first/last percentile are extrapolated with the slope of the end segments.

    Args:
        vals: intensities, any shape.
        pcts: the subject's intensities at the landmark percentiles, (K,), increasing.
        landmarks: standard-scale values, (K,).

    Returns:
        Mapped intensities, same shape as ``vals``.
    """
    pcts = np.maximum.accumulate(np.asarray(pcts, dtype=np.float64))
    pcts = pcts + np.arange(len(pcts)) * 1e-6 * max(float(np.abs(pcts).max()), 1.0)  # strictly increasing
    marks = np.asarray(landmarks, dtype=np.float64)
    out = np.interp(vals, pcts, marks)
    lo_slope = (marks[1] - marks[0]) / (pcts[1] - pcts[0])
    hi_slope = (marks[-1] - marks[-2]) / (pcts[-1] - pcts[-2])
    out = np.where(vals < pcts[0], marks[0] + (vals - pcts[0]) * lo_slope, out)
    out = np.where(vals > pcts[-1], marks[-1] + (vals - pcts[-1]) * hi_slope, out)
    return out.astype(np.float32)


def _histogram(vol: np.ndarray, cfg: PreprocessConfig, landmarks: Iterable[float], name: str) -> np.ndarray:
    mask, vals = _brain_values(vol, name)
    pcts = np.percentile(vals, cfg.landmark_percentiles)
    out = np.zeros_like(vol)
    out[mask] = apply_landmarks(vals, pcts, np.asarray(list(landmarks), dtype=np.float64))
    return out


def subject_percentiles(img: Any, cfg: PreprocessConfig) -> np.ndarray:
    """Brain intensities of one subject at ``cfg.landmark_percentiles``, on the target grid.

    Args:
        img: path or nibabel image.
        cfg: preprocessing config (geometry and landmark percentiles are used).

    Returns:
        (K,) float64, K = ``len(cfg.landmark_percentiles)``.
    """
    vol, _, _, name = _brain_on_grid(img, cfg)
    _, vals = _brain_values(vol, name)
    return np.percentile(vals, cfg.landmark_percentiles)


def landmarks_from_percentiles(percentiles: Iterable[np.ndarray]) -> tuple[float, ...]:
    """Nyul landmarks: map each subject's percentiles linearly onto [0, 1] (first -> 0, last -> 1), then average.

    Args:
        percentiles: one (K,) array per training subject (from :func:`subject_percentiles`).

    Returns:
        K standard-scale landmarks, first 0.0, last 1.0.

    Raises:
        ValueError: no subjects were given.
    """
    scaled = []
    for p in percentiles:
        p = np.asarray(p, dtype=np.float64)
        span = p[-1] - p[0]
        if span > 0:
            scaled.append((p - p[0]) / span)
    if not scaled:
        raise ValueError("cannot fit histogram landmarks: no usable training volumes")
    marks = np.maximum.accumulate(np.mean(scaled, axis=0))
    return tuple(round(float(m), 6) for m in marks)


def fit_histogram_landmarks(sources: Iterable[Any], cfg: PreprocessConfig) -> tuple[float, ...]:
    """Fit histogram-standardisation landmarks on training volumes (sequentially).

    Use ``dataclasses.replace(cfg, landmarks=...)`` to make a config that applies them.

    Args:
        sources: paths or nibabel images of the training split.
        cfg: preprocessing config.

    Returns:
        Landmarks, see :func:`landmarks_from_percentiles`.
    """
    return landmarks_from_percentiles(subject_percentiles(s, cfg) for s in sources)


def _brain_on_grid(img: Any, cfg: PreprocessConfig) -> tuple[np.ndarray, dict[str, float], list[str], str]:
    """Load, check, (raw: N4 + registration + brain extraction), crop and resample -> (vol, qc, warnings, name)."""
    data, affine, name = load_volume(img)
    if cfg.pipeline == "raw":
        from brainage_hpc.ingest.raw import raw_to_brain
        from brainage_hpc.ingest.template import load_template

        res = raw_to_brain(data, affine, name, cfg)
        vol = _geometry(res.brain, res.affine, cfg, centre_mm=load_template().brain_centre_mm)
        return vol, res.qc, res.warnings, name
    qc = check_skullstripped(data, affine, name)
    qc["contrast"] = contrast_index(data[data > 0])
    return _geometry(data, affine, cfg), qc, [], name


def contrast_index(values: np.ndarray) -> float:
    """Robust tissue contrast of brain intensities: (P90 - P10) / P50 (about 0.5-1.2 for T1w; ~0 for a flat image)."""
    if values.size == 0:
        return 0.0
    p10, p50, p90 = np.percentile(values, (10, 50, 90))
    return round(float((p90 - p10) / p50), 4) if p50 > 0 else 0.0


def prepare_volume(
    img: Any, cfg: PreprocessConfig, landmarks: Iterable[float] | None = None
) -> tuple[np.ndarray, dict[str, float], list[str]]:
    """Like :func:`preprocess_volume`, plus the scan's QC numbers and warnings.

    Returns:
        (volume (D, H, W) float16, qc {name: number}, warnings). QC numbers: size and
        shape of the brain (``extent_x_mm``.., ``volume_ml``, ``foreground_fraction``,
        ``solidity``), ``contrast``, and for ``pipeline="raw"`` also the registration
        similarity and SNR (see :mod:`brainage_hpc.ingest.raw`).
    """
    marks = cfg.landmarks if landmarks is None else tuple(landmarks)
    if cfg.intensity == "histogram" and marks is None:
        raise ValueError(
            "intensity='histogram' needs landmarks: fit them with fit_histogram_landmarks on the training split"
        )
    vol, qc, warnings, name = _brain_on_grid(img, cfg)
    out = _zscore(vol, cfg, name) if cfg.intensity == "zscore" else _histogram(vol, cfg, marks or (), name)
    return out.astype(np.float16), qc, warnings


def preprocess_volume(img: Any, cfg: PreprocessConfig, landmarks: Iterable[float] | None = None) -> np.ndarray:
    """Preprocess one T1w volume (see the module docstring for the steps).

    Args:
        img: a NIfTI path or nibabel image of any shape, voxel size and orientation;
            skull-stripped (background exactly 0) like HCP's ``*_brain`` file for
            ``pipeline="skullstripped"``, a scanner T1w with skull for ``pipeline="raw"``.
        cfg: preprocessing config.
        landmarks: histogram landmarks; default ``cfg.landmarks``. Needed only for
            ``intensity="histogram"``.

    Returns:
        (D, H, W) float16 in RAS order; background 0.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is unreadable (bad gzip CRC, truncated), not 3D, non-finite,
            all zero, constant, without voxels > 0, or not plausibly a brain (the message
            starts with the file name), or histogram landmarks are missing.
    """
    return prepare_volume(img, cfg, landmarks)[0]
