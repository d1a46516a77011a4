"""evaluate / predict / gradcam / latent / generate on runs trained by a fixture, through the CLI."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainage_hpc.cli import main
from tests.conftest import train_overrides

pytestmark = pytest.mark.slow


def _train(shards: Path, model: str, run_dir: Path) -> Path:
    from brainage_hpc.config import load_config
    from brainage_hpc.engine.run import train_main

    cfg = load_config("cnn_demo", train_overrides(
        shards, model, "train.backend=single", "train.precision=32", "train.max_steps=6", "train.epochs=100",
    ))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    assert train_main(cfg, run_dir) == 0
    # in-process training must give the signal handlers back (forked children must stay killable)
    assert {s: signal.getsignal(s) for s in before} == before
    return run_dir


@pytest.fixture(scope="module")
def cnn_run(tiny_shards, tmp_path_factory) -> Path:
    return _train(tiny_shards, "cnn3d", tmp_path_factory.mktemp("runs") / "cnn")


@pytest.fixture(scope="module")
def cvae_run(tiny_shards, tmp_path_factory) -> Path:
    return _train(tiny_shards, "cvae", tmp_path_factory.mktemp("runs") / "cvae")


def _manifest(shards: Path):
    from brainage_hpc.data.shards import load_manifest

    return load_manifest(shards)


def test_evaluate_metrics_match_predictions_csv(cnn_run, tiny_shards, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--run-dir", str(cnn_run), "--shards", str(tiny_shards), "--out", str(out)]) == 0
    assert main(["evaluate", "--run-dir", str(cnn_run), "--shards", str(tiny_shards), "--split", "val"]) == 0
    for name in ("predictions.csv", "metrics.json", "pred_vs_true.png", "confusion_4class.png",
                 "confusion_2class.png", "error_per_bin.png", "report.md"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    df = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    assert df["subject_id"].tolist() == _manifest(tiny_shards).splits["test"] and m["n"] == len(df)

    err = df["pred_age"] - df["age"]
    reg = m["regression"]
    assert reg["mae"] == pytest.approx(err.abs().mean())
    assert reg["rmse"] == pytest.approx(math.sqrt((err**2).mean()))
    assert reg["r2"] == pytest.approx(1 - (err**2).sum() / ((df["age"] - df["age"].mean()) ** 2).sum())
    cm = np.zeros((4, 4), int)
    np.add.at(cm, (df["age_bin"].to_numpy(int), df["age_bin_pred"].to_numpy(int)), 1)
    assert m["classification"]["4class"]["confusion_matrix"] == cm.tolist()
    assert m["classification"]["4class"]["f1_micro"] == pytest.approx((df["age_bin"] == df["age_bin_pred"]).mean())
    assert m["classification"]["2class"]["accuracy"] == pytest.approx((df["class2"] == df["class2_pred"]).mean())
    train = [s for s in _manifest(tiny_shards).splits["train"]]
    ages = [_manifest(tiny_shards).subjects[s]["age"] for s in train]
    assert m["baselines"]["regression"]["constant"] == pytest.approx(np.mean(ages))

    # bias correction: fitted by least squares on the validation predictions, applied to the test ones
    val = pd.read_csv(cnn_run / "eval-val" / "predictions.csv")
    bc = m["bias_correction"]
    if "alpha" in bc:
        alpha, beta = np.polyfit(val["age"], val["pred_age"], 1)
        assert bc["alpha"] == pytest.approx(alpha, rel=1e-6) and bc["beta"] == pytest.approx(beta, rel=1e-6)
        corrected = (df["pred_age"] - beta) / alpha
        np.testing.assert_allclose(df["pred_age_corrected"], corrected, rtol=1e-6)
        assert m["regression_bias_corrected"]["mae"] == pytest.approx((corrected - df["age"]).abs().mean())
    else:  # the tiny run predicts a constant: the reason is reported instead
        assert "do not follow age" in bc["skipped"] and df["pred_age_corrected"].isna().all()
    report = (out / "report.md").read_text()
    assert "| VAE-C | 0.515 | 0.626 | seed, HCP test |" in report and "(confusion_4class.png)" in report


def test_gradcam_nifti_on_the_shard_grid(cnn_run, cvae_run, tiny_shards, tmp_path):
    import nibabel as nib

    man = _manifest(tiny_shards)
    subject = man.splits["test"][1]
    for run, method in ((cnn_run, "gradcam"), (cvae_run, "gradcampp")):
        out = tmp_path / f"cam-{run.name}"
        argv = ["gradcam", "--run-dir", str(run), "--shards", str(tiny_shards), "--method", method,
                "--subjects", subject, "--max-subjects", "4", "--out", str(out)]
        assert main(argv) == 0
        for name in (f"gradcam-{subject}.nii.gz", "group-mean-gradcam.nii.gz"):
            img = nib.load(out / name)
            data = np.asarray(img.dataobj)
            assert img.shape == tuple(man.shape) and np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1
            np.testing.assert_allclose(img.affine, np.asarray(man.affine))
        summary = json.loads((out / "gradcam.json").read_text())
        assert summary["n_group"] == 4 and summary["subjects"] == [subject] and summary["method"] == method
        assert f"(gradcam-{subject}.png)" in (out / "report.md").read_text()


def test_gradcam_bad_subject_is_one_line(cnn_run, tiny_shards, tmp_path, capsys):
    argv = ["gradcam", "--run-dir", str(cnn_run), "--shards", str(tiny_shards), "--subjects", "000", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"brainage gradcam: error: subject(s) 000 not in split 'test' of {tiny_shards}"


def test_latent_and_generate(cvae_run, cnn_run, tiny_shards, tmp_path, capsys):
    import nibabel as nib

    man = _manifest(tiny_shards)
    out = tmp_path / "latent"
    assert main(["latent", "--run-dir", str(cvae_run), "--shards", str(tiny_shards), "--split", "val", "--out", str(out)]) == 0
    lat = pd.read_csv(out / "latent.csv")
    assert len(lat) == len(man.splits["val"]) and sum(c.startswith("mu_") for c in lat.columns) == 8
    assert (out / "latent-pca.png").is_file() and (out / "latent-tsne.png").is_file()

    gen = tmp_path / "gen"
    assert main(["generate", "--run-dir", str(cvae_run), "--age", "23", "36", "--sex", "M", "--n", "2", "--out", str(gen)]) == 0
    summary = json.loads((gen / "generate.json").read_text())
    assert len(summary["files"]) == 4 and (gen / "age-strip.png").is_file() and (gen / "gen-age36.png").is_file()
    for name in summary["files"]:
        img = nib.load(gen / name)
        assert img.shape == tuple(man.shape) and np.isfinite(np.asarray(img.dataobj)).all()
        np.testing.assert_allclose(img.affine, np.asarray(man.affine))
    csf = summary["csf"]
    assert csf["youngest_age"] == 23 and csf["oldest_age"] == 36 and isinstance(csf["oldest_larger"], bool)
    assert "Oldest (36 y) minus youngest (23 y)" in (gen / "report.md").read_text()

    capsys.readouterr()
    assert main(["latent", "--run-dir", str(cnn_run), "--shards", str(tiny_shards), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("brainage latent: error: ") and "is not a conditional VAE" in err and "\n" not in err


def test_predict_raw_nifti_of_another_grid(cnn_run, tmp_path, capsys):
    import nibabel as nib

    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    make_cohort(tmp_path / "raw", SynthConfig(n_subjects=1, seed=7, voxel_mm=4.0), progress=False)
    good = next((tmp_path / "raw").rglob("*.nii.gz"))
    assert nib.load(good).header.get_zooms()[:3] == (4.0, 4.0, 4.0)  # training: 5 mm, 32^3
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a nifti")
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8, 3).astype(np.float32), np.eye(4)), four_d)

    csv = tmp_path / "pred.csv"
    rc = main(["predict", "--checkpoint", str(cnn_run), "--input", str(good), str(bad), str(four_d), "--out", str(csv)])
    captured = capsys.readouterr()
    assert rc == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("brainage predict: error: ")]
    assert len(errors) == 2 and str(bad) in errors[0] and str(four_d) in errors[1] and "4D" in errors[1]
    df = pd.read_csv(csv)
    assert df["file"].tolist() == [str(good), str(bad), str(four_d)]
    assert np.isfinite(df["pred_age"][0]) and df["pred_age"][1:].isna().all() and df["error"][1:].notna().all()

    assert main(["predict", "--checkpoint", str(cnn_run), "--input", str(tmp_path / "raw"), "--sex", "F"]) == 0
    assert capsys.readouterr().out.startswith(f"{good.absolute()}\t")  # without --out the ages go to stdout


def test_explain_writes_maps_and_faithfulness(cnn_run, cvae_run, tiny_shards, synthetic_cohort, tmp_path):
    out = tmp_path / "explain"
    args = ["--shards", str(tiny_shards), "--max-subjects", "2", "--curve-subjects", "1"]
    assert main(["explain", "--run-dir", str(cnn_run), *args, "--method", "gradcam", "ig", "--out", str(out)]) == 0
    f = json.loads((out / "faithfulness.json").read_text())
    assert set(f["methods"]) == {"gradcam", "ig"} and f["truth"].startswith("|Pearson r|")
    for m, r in f["methods"].items():
        assert math.isfinite(r["enrichment"]) and math.isfinite(r["aopc_deletion"]) and r["n_subjects"] == 2, m
        assert (out / f"{m}-group.nii.gz").is_file() and (out / f"{m}-group.png").is_file()
    assert "| gradcam |" in (out / "report.md").read_text()
    gen = tmp_path / "generator-truth"  # the generator's age effect, mapped from the cohort grid to the shard grid
    truth = synthetic_cohort / "truth" / "age_effect.nii.gz"
    assert main(["explain", "--run-dir", str(cnn_run), *args, "--method", "gradcam", "--truth", str(truth), "--out", str(gen)]) == 0
    g = json.loads((gen / "faithfulness.json").read_text())
    assert g["truth"] == str(truth) and math.isfinite(g["methods"]["gradcam"]["enrichment"])
    cf = tmp_path / "cf"
    assert main(["explain", "--run-dir", str(cvae_run), *args, "--method", "counterfactual", "--truth", "none", "--out", str(cf)]) == 0
    r = json.loads((cf / "faithfulness.json").read_text())["methods"]["counterfactual"]
    assert "enrichment" not in r and math.isfinite(r["aopc_deletion"])


@pytest.mark.parametrize("extra, message", [
    (["--method", "gradcm"], "unknown method 'gradcm'. Did you mean 'gradcam'"),
    (["--method", "counterfactual"], "needs a conditional VAE run"),
    (["--method", "gradcam", "--truth", "BAD"], "truth map has shape (4, 5, 6), the shards (32, 32, 32)"),
])
def test_explain_faults_are_one_line_errors(cnn_run, tiny_shards, tmp_path, capsys, extra, message):
    from brainage_hpc.report import save_nifti

    bad = save_nifti(np.ones((4, 5, 6)), np.eye(4), tmp_path / "bad.nii.gz")
    extra = [str(bad) if a == "BAD" else a for a in extra]
    assert main(["explain", "--run-dir", str(cnn_run), "--shards", str(tiny_shards), *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("command", ["evaluate", "gradcam", "explain", "latent"])
def test_an_output_folder_under_a_file_is_one_line(command, cnn_run, cvae_run, tiny_shards, tmp_path, capsys):
    """--out inside a regular file: one line naming the folder, nothing computed or half written."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    run = cvae_run if command == "latent" else cnn_run
    extra = {"explain": ["--method", "gradcam", "--truth", "none"]}.get(command, [])
    capsys.readouterr()
    rc = main([command, "--run-dir", str(run), "--shards", str(tiny_shards), *extra, "--out", str(blocker / "out")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith(f"brainage {command}: error: ") and "\n" not in err, err
    assert str(blocker) in err and "is not a folder" in err
