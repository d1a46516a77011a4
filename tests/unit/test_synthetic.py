import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from brainage_hpc.data.ages import AGE_BINS, age_to_bin
from brainage_hpc.ingest.synthetic import AGE_DEPENDENT_FEATURES, SynthConfig, make_cohort


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_layout_affine_and_csvs_agree(synthetic_cohort):
    root = synthetic_cohort
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(subjects) == 40
    unres = {r["Subject"]: r for r in _rows(root / "unrestricted.csv")}
    res = {r["Subject"]: r for r in _rows(root / "restricted.csv")}
    fs = {r["Subject"]: r for r in _rows(root / "freesurfer.csv")}
    assert set(unres) == set(res) == set(fs) == set(subjects)
    for s in subjects:
        img = nib.load(root / s / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz")
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = np.asarray(img.dataobj)
        assert data.ndim == 3 and np.isfinite(data).all() and data.max() > 0
        assert unres[s]["Gender"] in ("M", "F")
        assert AGE_BINS[unres[s]["Age"]] == age_to_bin(int(res[s]["Age_in_Yrs"]))
    families = {r["Family_ID"] for r in res.values()}
    assert len(families) < 40  # some siblings


def test_atrophy_is_real(synthetic_cohort):
    """CSF-like (dark, inside the brain) volume grows with age: r > 0.5."""
    truth = json.loads((synthetic_cohort / "truth.json").read_text())
    ages, frac = [], []
    for s in truth["subjects"]:
        data = np.asarray(nib.load(synthetic_cohort / s["subject"] / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz").dataobj)
        brain = ndimage.binary_fill_holes(data > 0)
        dark = (data < 350) & brain
        ages.append(s["age"])
        frac.append(dark.sum() / brain.sum())
    r = stats.pearsonr(ages, frac).statistic
    assert r > 0.5, r


def test_table_age_dependence(synthetic_cohort):
    truth = json.loads((synthetic_cohort / "truth.json").read_text())
    ages = {s["subject"]: s["age"] for s in truth["subjects"]}
    rows = _rows(synthetic_cohort / "freesurfer.csv")
    a = np.array([ages[r["Subject"]] for r in rows])
    vent = np.array([float(r["LatVent_Vol"]) / float(r["IntraCranial_Vol"]) for r in rows])
    assert stats.pearsonr(a, vent).statistic > 0.5
    assert set(AGE_DEPENDENT_FEATURES) <= set(rows[0])


def test_same_seed_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = SynthConfig(n_subjects=2, seed=7, voxel_mm=4.0)
    make_cohort(a, cfg, progress=False)
    make_cohort(b, cfg, progress=False, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 4
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = tmp_path / "c"
    make_cohort(c, SynthConfig(n_subjects=2, seed=8, voxel_mm=4.0), progress=False)
    assert (a / "restricted.csv").read_bytes() != (c / "restricted.csv").read_bytes() or any(
        (a / f).read_bytes() != (c / f).read_bytes() for f in files
    )


def test_shape_option(tmp_path):
    make_cohort(tmp_path, SynthConfig(n_subjects=1, seed=0, voxel_mm=4.0, shape=(40, 48, 40)), progress=False)
    (img_path,) = tmp_path.rglob("*.nii.gz")
    img = nib.load(img_path)
    assert img.shape == (40, 48, 40)
    assert np.allclose(np.diag(img.affine)[:3], 4.0)


def test_synth_cli(tmp_path):
    from brainage_hpc.cli import main

    assert main(["synth", "--out", str(tmp_path / "c"), "--n-subjects", "2", "--voxel-mm", "4", "--no-progress"]) == 0
    assert (tmp_path / "c" / "unrestricted.csv").is_file()
    with pytest.raises(ValueError):
        main(["synth", "--out", str(tmp_path / "d"), "--n-subjects", "0"])
