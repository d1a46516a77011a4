import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from brainage_hpc.data.ages import AGE_BINS, age_to_bin
from brainage_hpc.ingest.synthetic import (
    AGE_DEPENDENT_FEATURES,
    AGE_EFFECT_FILE,
    PRESETS,
    REFERENCE_BRAIN_FILE,
    SynthConfig,
    age_information_floor,
    make_cohort,
)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_layout_affine_and_csvs_agree(synthetic_cohort):
    root = synthetic_cohort
    subjects = sorted(p.name for p in root.iterdir() if (p / "T1w").is_dir())
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
    assert len(files) == 2 + 6  # volumes + 3 CSVs, truth.json, age_effect, reference brain
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = tmp_path / "c"
    make_cohort(c, SynthConfig(n_subjects=2, seed=8, voxel_mm=4.0), progress=False)
    assert (a / "restricted.csv").read_bytes() != (c / "restricted.csv").read_bytes() or any(
        (a / f).read_bytes() != (c / f).read_bytes() for f in files
    )


def test_shape_option(tmp_path):
    make_cohort(tmp_path, SynthConfig(n_subjects=1, seed=0, voxel_mm=4.0, shape=(40, 48, 40)), progress=False)
    (img_path,) = tmp_path.rglob("T1w_*.nii.gz")
    img = nib.load(img_path)
    assert img.shape == (40, 48, 40)
    assert np.allclose(np.diag(img.affine)[:3], 4.0)


def test_synth_cli(tmp_path):
    from brainage_hpc.cli import main

    assert main(["synth", "--out", str(tmp_path / "c"), "--n-subjects", "2", "--voxel-mm", "4", "--no-progress"]) == 0
    assert (tmp_path / "c" / "unrestricted.csv").is_file()
    with pytest.raises(ValueError):
        main(["synth", "--out", str(tmp_path / "d"), "--n-subjects", "0"])


def test_default_preset_volumes_are_unchanged(tmp_path):
    """The realistic preset and the measured table must not change the default preset's images."""
    make_cohort(tmp_path, SynthConfig(n_subjects=1, seed=5, voxel_mm=4.0), progress=False)
    data = np.asarray(nib.load(tmp_path / "100206" / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz").dataobj)
    assert data.dtype == np.int16 and data.shape == (49, 58, 47)
    assert hashlib.sha256(data.tobytes()).hexdigest()[:16] == "aabbd4bb6b1540fd"  # written by the pre-preset generator


def test_table_is_measured_from_the_written_volume(tmp_path):
    """Editing a saved volume changes what is measured: the table is not the generator's truth."""
    from brainage_hpc.ingest import synthetic as syn
    from brainage_hpc.ingest.synthetic_measure import measure_table

    cfg = SynthConfig(n_subjects=1, seed=2, voxel_mm=4.0)
    make_cohort(tmp_path, cfg, progress=False)
    path = next(tmp_path.rglob("T1w_acpc_dc_restore_brain.nii.gz"))
    data = np.asarray(nib.load(path).dataobj)
    table = {k: float(v) for k, v in _rows(tmp_path / "freesurfer.csv")[0].items() if k != "Subject"}
    syn._init_worker(cfg)
    draws = {k: 1.0 for k in table if not k.startswith("Misc_")}

    def measure(vol):
        return measure_table(vol, 4.0, syn.REGIONS, syn._WORKER["priors"], lambda a: a, draws, np.random.default_rng(0))

    before = measure(data)
    # the table's values are these measurements times a few % of measurement noise
    for key in ("IntraCranial_Vol", "TotalGray_Vol", "LatVent_Vol", "lh_frontal_sup_GrayVol"):
        assert table[key] == pytest.approx(before[key], rel=0.15), key
        assert table[key] != pytest.approx(before[key], rel=1e-6), key
    darker = data.copy()
    centre = tuple(s // 2 for s in data.shape)
    box = tuple(slice(c - 3, c + 3) for c in centre)
    darker[box] = np.where(darker[box] > 0, 180, 0)  # widen the ventricles: CSF intensity
    after = measure(darker)
    assert after["LatVent_Vol"] > before["LatVent_Vol"] * 1.1


def test_age_effect_map_matches_the_cohort(synthetic_cohort):
    """The written age-effect map is where old and young subjects differ."""
    effect_img = nib.load(synthetic_cohort / AGE_EFFECT_FILE)
    ref = nib.load(synthetic_cohort / REFERENCE_BRAIN_FILE)
    truth = json.loads((synthetic_cohort / "truth.json").read_text())
    first = nib.load(synthetic_cohort / truth["subjects"][0]["subject"] / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz")
    assert effect_img.shape == ref.shape == first.shape
    np.testing.assert_allclose(effect_img.affine, first.affine)
    effect = np.asarray(effect_img.dataobj, dtype=np.float32)
    assert effect.min() < 0  # GM -> CSF and WM -> ventricle: the T1w signal falls with age
    subjects = sorted(truth["subjects"], key=lambda s: s["age"])
    vols = [np.asarray(nib.load(synthetic_cohort / s["subject"] / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz").dataobj,
                       dtype=np.float32) for s in subjects]
    k = len(vols) // 3
    diff = ndimage.gaussian_filter(np.mean(vols[-k:], 0) - np.mean(vols[:k], 0), 1.0)
    top = np.abs(effect) >= np.quantile(np.abs(effect[effect != 0]), 0.9)
    rest = (np.asarray(ref.dataobj) > 0) & ~top
    assert diff[top].mean() < 2 * diff[rest].mean() - 20  # old subjects are darker where the map says so
    assert stats.spearmanr(-effect[top | rest], diff[top | rest]).statistic < 0


def test_presets_and_information_floor():
    real = SynthConfig.preset("realistic", n_subjects=5, seed=3)
    assert real.preset_name == "realistic" and real.n_subjects == 5 and real.n_sites > 1
    assert real.gm_loss_per_year < SynthConfig().gm_loss_per_year
    assert SynthConfig.preset("default") == SynthConfig()
    assert set(PRESETS) == {"default", "realistic"}
    assert age_information_floor(SynthConfig(), n=40000) < 1.0
    assert 2.0 <= age_information_floor(real, n=40000) <= 3.0
    with pytest.raises(ValueError, match="Valid: default, realistic"):
        SynthConfig.preset("hard")
    with pytest.raises(ValueError, match="n_sites"):
        SynthConfig(n_sites=0)


def test_realistic_cohort_has_sites_and_differs(tmp_path):
    from brainage_hpc.cli import main

    assert main(["synth", "--out", str(tmp_path), "--n-subjects", "4", "--voxel-mm", "4", "--seed", "3",
                 "--difficulty", "realistic", "--no-progress"]) == 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["preset"] == "realistic" and 2.0 < truth["age_information_floor_mae"] < 3.0
    assert len({s["site"] for s in truth["subjects"]}) > 1
    rows = _rows(tmp_path / "freesurfer.csv")
    assert all(np.isfinite(float(v)) for r in rows for k, v in r.items() if k != "Subject")
