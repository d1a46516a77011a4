"""Per-subject preprocessing on small in-memory brains (ellipsoids with a WM/GM contrast)."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainage_hpc.ingest.preprocess import (
    PreprocessConfig,
    apply_landmarks,
    fit_histogram_landmarks,
    landmarks_from_percentiles,
    preprocess_volume,
    reference_affine,
)

SMALL = PreprocessConfig(shape=(32, 40, 32), voxel_mm=4.0)


def _brain(shape=(60, 72, 60), voxel=2.0, seed=0, scale=1.0) -> nib.Nifti1Image:
    """A skull-stripped ellipsoid 'brain' (~120 x 144 x 120 mm box) in RAS, background exactly 0."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0)) / 0.9
    vol = np.where(r < 0.6, 900.0, 500.0) * (1 + 0.05 * rng.standard_normal(shape)) * scale
    vol[r >= 1] = 0
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -voxel * (np.asarray(shape) - 1) / 2
    return nib.Nifti1Image(vol.astype(np.float32), affine)


def test_config_defaults_roundtrip_and_hash():
    cfg = PreprocessConfig()
    assert cfg.shape == (128, 128, 128) and cfg.voxel_mm == 1.0 and cfg.intensity == "zscore"
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.config_hash() == "3c410fd09f63d879"  # stable across runs and machines: shards record it
    assert PreprocessConfig(shape=[128, 128, 128]).config_hash() == cfg.config_hash()
    assert dataclasses.replace(cfg, voxel_mm=1.5).config_hash() != cfg.config_hash()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"intensity": "zscor"}, "Did you mean 'zscore'"),
        ({"shape": (1, 2)}, "3 positive integers"),
        ({"voxel_mm": 0}, "voxel_mm must be > 0"),
        ({"clip_percentiles": (99, 1)}, "clip_percentiles"),
        ({"landmarks": (0.0, 1.0)}, "one per landmark percentile"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="Did you mean 'voxel_mm'.*Valid: shape"):
        PreprocessConfig.from_dict({"voxel": 2.0})


@pytest.mark.parametrize(
    "in_shape, in_voxel, out_shape, out_voxel",
    [
        ((60, 72, 60), 2.0, (32, 40, 32), 4.0),
        ((99, 117, 95), 1.5, (48, 48, 48), 4.0),  # odd sizes; a plausible brain (1.4 L, not 3.3 L at 2 mm)
        ((40, 48, 40), 3.0, (24, 28, 24), 5.0),
        ((30, 36, 30), 4.0, (64, 64, 64), 2.5),
    ],
)
def test_shape_table(in_shape, in_voxel, out_shape, out_voxel):
    cfg = PreprocessConfig(shape=out_shape, voxel_mm=out_voxel)
    out = preprocess_volume(_brain(in_shape, in_voxel), cfg)
    assert out.shape == out_shape and out.dtype == np.float16
    assert np.isfinite(out).all()
    brain = out[out != 0].astype(np.float64)
    assert abs(brain.mean()) < 0.05 and abs(brain.std() - 1) < 0.05
    assert out[0, 0, 0] == 0 and out[-1, -1, -1] == 0  # background stays 0


def test_orientation_and_input_kind_do_not_matter(tmp_path: Path):
    img = _brain()
    ref = preprocess_volume(img, SMALL)
    # the same brain stored left-right flipped (LAS): data flipped, affine says so
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = img.shape[0] - 1
    las = nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip)
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    np.testing.assert_allclose(preprocess_volume(las, SMALL).astype(np.float32), ref.astype(np.float32), atol=1e-2)
    path = tmp_path / "t1.nii.gz"
    nib.save(img, path)
    assert np.array_equal(preprocess_volume(path, SMALL), preprocess_volume(str(path), SMALL))
    np.testing.assert_allclose(preprocess_volume(path, SMALL).astype(np.float32), ref.astype(np.float32), atol=1e-2)


def test_intensity_scale_and_int16_input_do_not_matter():
    a = preprocess_volume(_brain(scale=1.0), SMALL).astype(np.float32)
    img = _brain(scale=3.0)
    as_int = nib.Nifti1Image(np.round(np.asarray(img.dataobj)).astype(np.int16), img.affine)
    np.testing.assert_allclose(preprocess_volume(as_int, SMALL).astype(np.float32), a, atol=2e-2)


def test_trailing_singleton_dimension_is_accepted():
    img = _brain()
    four = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine)
    assert preprocess_volume(four, SMALL).shape == SMALL.shape


def _bad(tmp_path: Path, kind: str) -> Path:
    img = _brain()
    data = np.asarray(img.dataobj)
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "truncated":
        nib.save(img, path)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return path
    if kind == "4d":
        out = nib.Nifti1Image(np.stack([data, data], -1), img.affine)
    elif kind == "2d":
        out = nib.Nifti1Image(data[:, :, 30].copy(), img.affine)
    elif kind == "nan":
        data = data.copy()
        data[30, 30, 30] = np.nan
        out = nib.Nifti1Image(data, img.affine)
    elif kind == "zeros":
        out = nib.Nifti1Image(np.zeros_like(data), img.affine)
    elif kind == "constant":
        out = nib.Nifti1Image(np.where(data > 0, 7.0, 0).astype(np.float32), img.affine)
    elif kind == "garbage":
        path.write_bytes(gzip.compress(b"not a nifti at all" * 10))
        return path
    nib.save(out, path)
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("truncated", "truncated or corrupt"),
        ("4d", "is 4D with shape"),
        ("2d", "is 2D"),
        ("nan", "NaN/Inf voxels"),
        ("zeros", "all zeros"),
        ("constant", "constant"),
        ("garbage", "cannot read NIfTI header"),
    ],
)
def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path: Path, kind: str, match: str):
    path = _bad(tmp_path, kind)
    with pytest.raises(ValueError, match=match) as info:
        preprocess_volume(path, SMALL)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        preprocess_volume(tmp_path / "absent.nii.gz", SMALL)


def test_histogram_standardisation():
    cfg = dataclasses.replace(SMALL, intensity="histogram")
    with pytest.raises(ValueError, match="needs landmarks"):
        preprocess_volume(_brain(), cfg)
    marks = fit_histogram_landmarks([_brain(seed=s, scale=1 + s) for s in range(3)], cfg)
    assert len(marks) == len(cfg.landmark_percentiles) and marks[0] == 0.0 and marks[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(marks))
    fitted = dataclasses.replace(cfg, landmarks=marks)
    a = preprocess_volume(_brain(seed=5, scale=1.0), fitted).astype(np.float32)
    b = preprocess_volume(_brain(seed=5, scale=4.0), cfg, landmarks=marks).astype(np.float32)
    np.testing.assert_allclose(a, b, atol=1e-2)  # the standard scale removes the global scale
    brain = a[a != 0]
    assert -0.2 < brain.min() and brain.max() < 1.2
    assert PreprocessConfig.from_dict(fitted.to_dict()) == fitted


def test_apply_landmarks_is_monotone_and_extrapolates():
    pcts = np.array([10.0, 20.0, 40.0])
    marks = np.array([0.0, 0.5, 1.0])
    vals = np.array([0.0, 10.0, 15.0, 30.0, 40.0, 60.0])
    out = apply_landmarks(vals, pcts, marks)
    np.testing.assert_allclose(out, [-0.5, 0.0, 0.25, 0.75, 1.0, 1.5], atol=1e-5)
    with pytest.raises(ValueError, match="no usable"):
        landmarks_from_percentiles([])


def test_reference_affine_is_centred():
    aff = reference_affine(PreprocessConfig(shape=(3, 5, 7), voxel_mm=2.0))
    centre = aff @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(centre[:3], 0)
    np.testing.assert_allclose(np.diag(aff)[:3], 2.0)
