"""calibrate -> evaluate -> predict on a tiny trained CNN, through the CLI; OOD kinds; ensembles; faults.

The tiny fixture (tiny_shards: 24 train, 8 validation, 8 test subjects) has too few
validation subjects for 90 % conformal intervals (9 needed), which calibrate must say;
the interval columns are then checked with a conformal section fitted on the evaluated
predictions. Its OOD threshold is the largest of 8 validation scores, so the false-positive
check here is over the 32 in-distribution train + test scans (<= 5 %); the benchmark
(benchmarks/trust_calibration.py) measures it on a larger test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainage_hpc.cli import main
from tests.conftest import train_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    from brainage_hpc.config import load_config
    from brainage_hpc.engine.run import train_main

    run = tmp_path_factory.mktemp("calib") / "cnn"
    cfg = load_config("cnn_demo", train_overrides(tiny_shards, "cnn3d", "train.backend=single", "train.precision=32",
                                                  "train.max_steps=20", "train.epochs=100"))
    assert train_main(cfg, run) == 0
    return run


def test_calibrate_evaluate_predict_and_the_four_ood_kinds(trained, tiny_shards, synthetic_cohort, tmp_path, capsys):
    from benchmarks.trust_calibration import ood_volumes
    from brainage_hpc.data.dataset import ShardDataset
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.calibration import apply_calibration, fit_conformal, write_calibration
    from brainage_hpc.evaluation.evaluate import predict_split_features
    from brainage_hpc.evaluation.predict import load_model, predict_batch

    assert main(["calibrate", "--run-dir", str(trained), "--shards", str(tiny_shards)]) == 0
    said = capsys.readouterr().out
    assert "conformal skipped (too few validation subjects for 90% conformal intervals: 8 (needs at least 9))" in said
    cal = json.loads((trained / "calibration.json").read_text())
    assert cal["bias"]["n"] == 8 and "Beheshti" in cal["bias"]["reference"] and cal["ood"]["layer"] == "head_act"

    # OOD: the four kinds flagged, at most 5 % of the in-distribution train + test scans
    lm = load_model(trained, "cpu")
    manifest = load_manifest(tiny_shards)
    scores = []
    for split in ("train", "test"):
        df, feats = predict_split_features(lm, manifest, split)
        scores.append(apply_calibration(lm.calibration, df["pred_age"].to_numpy(), feats)["ood_flag"])
    assert np.concatenate(scores).mean() <= 0.05
    example = ShardDataset(manifest, "test")[0]["image"][0].float().numpy()
    vols = ood_volumes(example)
    out = predict_batch(lm, torch.from_numpy(np.stack(list(vols.values())))[:, None], torch.zeros(4))
    flags = apply_calibration(lm.calibration, out["pred_age"], out["features"])["ood_flag"]
    assert dict(zip(vols, flags.tolist())) == dict.fromkeys(vols, True)

    # evaluate: trust section; then give the calibration a conformal part to check the interval plumbing
    ev = tmp_path / "eval"
    assert main(["evaluate", "--run-dir", str(trained), "--shards", str(tiny_shards), "--out", str(ev)]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    t = m["trust"]
    assert t["calibration_source"] == "run" and t["baseline"]["strategy"] == "train_mean"
    assert t["uncorrected"]["mae"] == pytest.approx(m["regression"]["mae"]) and len(t["uncorrected"]["mae_ci95"]) == 2
    assert {"uncorrected", "corrected"} <= set(t["gap_age_r"]) and t["per_bin"] and t["ood"]["n"] == 8
    assert "predict train mean" in (ev / "report.md").read_text()
    pred = pd.read_csv(ev / "predictions.csv")
    cal["conformal"] = fit_conformal(np.r_[pred["age"], pred["age"]], np.r_[pred["pred_age"], pred["pred_age"]])
    write_calibration(trained / "calibration.json", cal)

    # predict (PyTorch and ONNX): the same calibrated columns; --bias-correct where the age is given
    subjects = sorted(synthetic_cohort.glob("*/T1w/*.nii.gz"))[:3]
    ages = {s: manifest.subjects[s]["age"] for s in manifest.subjects}
    table = tmp_path / "scans.csv"
    pd.DataFrame({"path": [str(p) for p in subjects], "subject": [p.parts[-3] for p in subjects],
                  "age": [ages.get(p.parts[-3]) for p in subjects], "sex": "F"}).to_csv(table, index=False)
    assert main(["export", "--run-dir", str(trained), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    frames = {}
    for name, ckpt in (("torch", trained), ("onnx", tmp_path / "m.onnx")):
        out_csv = tmp_path / f"{name}.csv"
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(table), "--out", str(out_csv), "--bias-correct",
                     "--workers", "0", "--no-progress", "--no-report"]) == 0
        frames[name] = pd.read_csv(out_csv)
    cols = ["age_lower", "age_upper", "ood_score", "ood_flag", "brain_age_corrected", "brain_age_gap_corrected"]
    for name, df in frames.items():
        assert set(cols) <= set(df.columns), name
        assert (df["age_lower"] < df["pred_age"]).all() and (df["pred_age"] < df["age_upper"]).all()
    assert np.allclose(frames["onnx"][cols[:3] + cols[4:]], frames["torch"][cols[:3] + cols[4:]], atol=0.02)


def test_calibration_faults_are_one_line_errors(trained, tiny_shards, tmp_path, capsys):
    from tests.predict_fixtures import make_run_dir

    other = make_run_dir(tmp_path / "other", shape=(32, 32, 32), voxel_mm=5.0)
    (other / "calibration.json").write_text((trained / "calibration.json").read_text()
                                            if (trained / "calibration.json").exists() else "{}")
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(other), "--shards", str(tiny_shards)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibration" in err and str(other) in err
    (other / "calibration.json").write_text("{not json")
    assert main(["evaluate", "--run-dir", str(other), "--shards", str(tiny_shards)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreadable calibration" in err
    assert main(["calibrate", "--run-dir", str(other), "--shards", str(tiny_shards)]) == 0  # refits over a stale one
    assert json.loads((other / "calibration.json").read_text())["format"] == "brainage-calibration"


def test_ensemble_of_two_seeds_reports_members_mae_and_refuses_mismatched_members(tiny_shards, tmp_path, capsys):
    from tests.predict_fixtures import make_run_dir

    runs = [make_run_dir(tmp_path / f"seed{s}", shape=(32, 32, 32), voxel_mm=5.0, seed=s, spread=5.0) for s in (0, 1)]
    out = tmp_path / "ens"
    assert main(["evaluate", "--checkpoint", *map(str, runs), "--shards", str(tiny_shards), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    ens = m["trust"]["ensemble"]
    pred = pd.read_csv(out / "predictions.csv")
    assert np.allclose(pred["pred_age"], (pred["member_0_age"] + pred["member_1_age"]) / 2)
    assert np.allclose(pred["ensemble_sd"], pred[["member_0_age", "member_1_age"]].std(axis=1))
    assert set(ens["members"]) == {"0", "1"} and ens["mae"] == pytest.approx(m["regression"]["mae"])
    assert "members' MAE" in capsys.readouterr().out
    odd = make_run_dir(tmp_path / "odd", shape=(16, 16, 16))
    assert main(["evaluate", "--checkpoint", str(runs[0]), str(odd), "--shards", str(tiny_shards)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "input shape" in err and "not one ensemble" in err


def test_trust_benchmark_quick_run_on_the_tiny_shards(tiny_shards, tmp_path):
    """benchmarks/trust_calibration.py's smoke run (registered in test_benchmarks_smoke.SMOKE_ELSEWHERE)."""
    from benchmarks.trust_calibration import main as bench_main

    out = tmp_path / "trust.json"
    assert bench_main(["--quick", "--shards", str(tiny_shards), "--presets", "default", "--no-ensemble", "--threads", "1",
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "trust_calibration" and r["quick"] is True and len(r["table"]["rows"]) == 1
    kinds = r["presets"]["default"]["ood_kinds"]
    assert set(kinds) == {"noise_cube", "box_phantom", "corrupted_50pct", "non_human_blob"}
