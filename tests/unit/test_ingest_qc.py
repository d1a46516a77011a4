"""QC outliers, brain plausibility numbers, the fingerprint, and the synthetic head (small arrays, no registration)."""

from __future__ import annotations

import numpy as np
import pytest

from brainage_hpc.ingest.fingerprint import fingerprint_differences, preprocessing_fingerprint
from brainage_hpc.ingest.plausibility import brain_stats, implausibility
from brainage_hpc.ingest.preprocess import PreprocessConfig
from brainage_hpc.ingest.qc import flag_outliers, render_slices, write_qc_page
from brainage_hpc.ingest.synthetic_head import HeadConfig, make_head


def test_robust_z_flags_the_odd_scan_only():
    rng = np.random.default_rng(0)
    qc = {f"s{i:02d}": {"similarity": 0.8 + 0.01 * rng.standard_normal(), "brain_volume_ml": 1400 + 60 * rng.standard_normal()}
          for i in range(20)}
    qc["s03"]["similarity"] = 0.45  # failed registration
    qc["s07"]["brain_volume_ml"] = 2500  # mask took the neck
    qc["s09"]["similarity"] = 0.95  # unusually good: not a problem
    out = flag_outliers(qc)
    assert sorted(out) == ["s03", "s07"]
    assert out["s03"][0].startswith("similarity 0.45 (robust z -") and "brain_volume_ml 2500" in out["s07"][0]
    assert flag_outliers({k: qc[k] for k in list(qc)[:5]}) == {}  # too few scans to compare


def test_brain_stats_and_reasons():
    g = np.linspace(-1, 1, 40)
    r = np.sqrt(sum(a**2 for a in np.meshgrid(g, g, g, indexing="ij")))
    ball = r < 0.9  # 40 voxels of 4 mm: a ball of radius 70 mm, 1.45 L
    stats = brain_stats(ball, np.diag([4.0, 4.0, 4.0, 1.0]))
    assert stats.extent_mm == (144.0, 144.0, 144.0) and 1400 < stats.volume_ml < 1500
    assert 0.85 < stats.solidity < 0.95 and implausibility(stats) is None
    assert "implausibly small" in implausibility(brain_stats(ball, np.diag([1.0, 1.0, 1.0, 1.0])))
    noise = np.random.default_rng(0).random((40, 40, 40)) > 0.5
    assert "not a solid object" in implausibility(brain_stats(noise, np.diag([4.0, 4.0, 4.0, 1.0])))
    assert implausibility(brain_stats(np.zeros((4, 4, 4), bool), np.eye(4))) == "no brain voxels"


def test_fingerprint_names_versions_and_differences():
    fp = preprocessing_fingerprint(PreprocessConfig(shape=(32, 32, 32)).to_dict())
    assert fp["pipeline"] == "skullstripped" and fp["template_sha256"] is None
    assert all(fp["versions"][k] for k in ("nibabel", "monai", "antspyx", "deepbet", "brainage_hpc"))
    assert fingerprint_differences(fp) == []
    old = {**fp, "versions": {**fp["versions"], "nibabel": "3.2.1"}}
    assert fingerprint_differences(old) == [f"nibabel 3.2.1 at training, {fp['versions']['nibabel']} installed"]
    raw = preprocessing_fingerprint(PreprocessConfig(shape=(32, 32, 32), pipeline="raw").to_dict())
    assert len(raw["template_sha256"]) == 64 and raw["config"]["raw"]["similarity_min"] == 0.4
    assert fingerprint_differences({**raw, "template_sha256": "0" * 64}) == [
        "registration template differs (sha256) from the one used for training"
    ]


def test_raw_pipeline_key_keeps_old_hashes():
    cfg = PreprocessConfig()
    assert cfg.config_hash() == "3c410fd09f63d879"  # shard sets made before `pipeline` existed stay readable
    assert PreprocessConfig(pipeline="raw").config_hash() != cfg.config_hash()
    with pytest.raises(ValueError, match="Did you mean 'raw'"):
        PreprocessConfig(pipeline="rwa")


def _ball_brain() -> tuple[np.ndarray, np.ndarray]:
    g = [np.linspace(-1, 1, n) for n in (36, 44, 36)]
    r = np.sqrt(sum(a**2 for a in np.meshgrid(*g, indexing="ij")))
    brain = np.where(r < 0.9, np.where(r < 0.5, 900.0, 550.0), 0.0).astype(np.float32)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = -4.0 * (np.array(brain.shape) - 1) / 2
    return brain, aff


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_synthetic_head_layers_orientation_and_truth_mask(orientation: str):
    import nibabel as nib

    brain, aff = _ball_brain()
    cfg = HeadConfig(voxel_mm=(4.0, 4.0, 5.0), rotation_deg=(10.0, 0.0, 0.0), orientation=orientation)
    head = make_head(brain, aff, cfg, np.random.default_rng(0))
    assert "".join(nib.aff2axcodes(head.affine)) == orientation and np.allclose(np.abs(np.diag(head.affine))[:3], (4, 4, 5))
    assert head.data.dtype == np.int16 and (head.data > 0).mean() > 0.95  # Rician background is > 0
    truth_ml = head.brain_mask.sum() * 80 / 1000
    assert abs(truth_ml - (brain > 0).sum() * 64 / 1000) < 0.1 * truth_ml
    inside = head.data[head.brain_mask].mean()
    skull_and_scalp = head.data[~head.brain_mask & (head.data > 0.3 * inside)].size
    assert skull_and_scalp > 0.5 * head.brain_mask.sum()  # much more than the brain is bright: scalp, neck


def test_qc_page_and_png(tmp_path):
    brain, _ = _ball_brain()
    render_slices(brain, tmp_path / "a.png", "a", template=brain)
    assert (tmp_path / "a.png").stat().st_size > 1000
    page = write_qc_page(tmp_path, [{"id": "a", "png": "a.png", "qc": {"similarity": 0.8}}], {"a": ["similarity 0.8"]},
                         "QC", "note")
    text = page.read_text()
    assert 'class="out"' in text and 'src="a.png"' in text and "OUTLIER" in text


def test_predict_warns_once_when_the_fingerprint_differs(capsys):
    """brainage predict names what differs from training on stderr, in one line, and still scores."""
    from types import SimpleNamespace

    from brainage_hpc.evaluation.cohort_predict import warn_fingerprint

    fp = preprocessing_fingerprint(PreprocessConfig(shape=(32, 32, 32)).to_dict())
    assert warn_fingerprint(SimpleNamespace(fingerprint=fp, source="run")) == []
    assert capsys.readouterr().err == ""
    old = {**fp, "versions": {**fp["versions"], "monai": "0.1.0"}}
    assert len(warn_fingerprint(SimpleNamespace(fingerprint=old, source="run/last.pt"))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run/last.pt" in err and "monai 0.1.0 at training" in err


def test_a_box_phantom_fails_only_the_box_fill_check():
    box = np.zeros((50, 60, 50), bool)
    box[10:40, 12:47, 10:40] = True  # 120 x 140 x 120 mm at 4 mm, 2016 ml: size, volume, fraction, solidity pass
    problem = implausibility(brain_stats(box, np.diag([4.0, 4.0, 4.0, 1.0])))
    assert problem is not None and problem.startswith("foreground fills 100% of its") and "box or phantom" in problem
