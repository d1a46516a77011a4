"""Evaluation without a trained model: metrics of prediction tables, bias correction, reports, CLI errors."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pandas as pd
import pytest

from brainage_hpc.cli import main
from brainage_hpc.evaluation.evaluate import compute_metrics
from brainage_hpc.evaluation.predict import class_centres
from brainage_hpc.evaluation.scans import collect_scans, failure_message
from brainage_hpc.report import SEED_REFERENCE, atomic_path, reference_table, write_report


def _table(age: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    from brainage_hpc.data.ages import age_to_bin

    bins = np.array([age_to_bin(a) for a in np.floor(age)])
    pbins = np.array([age_to_bin(p) for p in pred])
    return pd.DataFrame({
        "subject_id": [str(i) for i in range(len(age))], "sex": np.arange(len(age)) % 2, "age": age,
        "age_bin": bins, "class2": (bins >= 2).astype(int), "pred_age": pred,
        "age_bin_pred": pd.array(pbins, dtype="Int64"), "class2_pred": (pbins >= 2).astype(int),
    })


def test_bias_correction_recovers_known_alpha_beta():
    rng = np.random.default_rng(0)
    alpha, beta = 0.6, 11.0  # regression to the mean: old predicted too young, young too old
    val_age, test_age = rng.uniform(22, 37, 200), rng.uniform(22, 37, 100)
    val = _table(val_age, alpha * val_age + beta + rng.normal(0, 0.05, 200))
    test = _table(test_age, alpha * test_age + beta + rng.normal(0, 0.05, 100))
    metrics, corrected = compute_metrics(test, val, val)
    bc = metrics["bias_correction"]
    assert bc["alpha"] == pytest.approx(alpha, abs=0.01) and bc["beta"] == pytest.approx(beta, abs=0.3)
    assert bc["fitted_on"] == "val" and bc["n_fit"] == 200 and "warning" not in bc
    assert corrected is not None and np.abs(corrected - test_age).max() < 0.5
    assert metrics["regression_bias_corrected"]["mae"] < 0.2 < metrics["regression"]["mae"]


def test_metrics_match_a_hand_computation():
    age = np.array([22.5, 24.0, 27.0, 29.0, 32.0, 34.0, 36.5, 25.0])
    pred = np.array([25.0, 23.0, 28.0, 33.0, 30.0, 36.0, 33.0, 26.0])
    test = _table(age, pred)
    train = _table(np.array([22.0, 23.0, 24.0, 30.0, 33.0]), np.zeros(5) + 25)
    m, corrected = compute_metrics(test, None, train)
    err = pred - age
    assert m["regression"]["mae"] == pytest.approx(np.abs(err).mean())
    assert m["regression"]["rmse"] == pytest.approx(math.sqrt((err**2).mean()))
    assert m["regression"]["r2"] == pytest.approx(1 - (err**2).sum() / ((age - age.mean()) ** 2).sum())
    assert m["regression"]["pearson_r"] == pytest.approx(np.corrcoef(age, pred)[0, 1])
    # bins: true [0,0,1,1,2,2,3,0]; predicted [0,0,1,2,1,3,2,1]
    cm4 = np.zeros((4, 4), int)
    for t, p in zip([0, 0, 1, 1, 2, 2, 3, 0], [0, 0, 1, 2, 1, 3, 2, 1]):
        cm4[t, p] += 1
    assert m["classification"]["4class"]["confusion_matrix"] == cm4.tolist()
    assert m["classification"]["4class"]["f1_micro"] == pytest.approx(3 / 8)
    assert m["classification"]["2class"]["accuracy"] == pytest.approx(6 / 8)
    assert m["baselines"]["4class"]["constant"] == 0 and m["baselines"]["4class"]["accuracy"] == pytest.approx(3 / 8)
    assert m["baselines"]["regression"]["constant"] == pytest.approx(26.4)
    assert m["bias_correction"] == {"skipped": "no validation split to fit it on"} and corrected is None


def test_bins_only_and_two_class_models():
    test = _table(np.array([23.0, 27.0, 33.0, 35.0]), np.array([24.0, 26.0, 30.0, 34.0]))
    test["age"] = np.nan  # only the bins are known
    test["age_bin_pred"] = pd.array([pd.NA] * 4, dtype="Int64")  # a 2-class model gives no 4-class answer
    m, corrected = compute_metrics(test, test, test)
    assert m["regression"] is None and "only age bins" in m["regression_skipped"]
    assert "4class" not in m["classification"] and m["classification"]["2class"]["accuracy"] == pytest.approx(0.75)
    assert "skipped" in m["bias_correction"] and corrected is None


def test_flat_predictions_skip_the_correction_with_the_reason():
    age = np.linspace(22, 36, 10)
    val = _table(age, np.full(10, 29.0))
    m, corrected = compute_metrics(val, val, val)
    assert corrected is None and "do not follow age" in m["bias_correction"]["skipped"]


def test_class_centres_and_collect_scans(tmp_path):
    assert class_centres(4).tolist() == [23.5, 28.0, 33.0, 36.5]
    assert class_centres(2).tolist() == [26.0, 34.0]
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.nii.gz", "a/b/y.nii", "a/notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "empty").mkdir()
    scans, failures = collect_scans([tmp_path / "a", tmp_path / "missing.nii.gz", tmp_path / "empty", tmp_path / "a/x.nii.gz"])
    assert [s.subject for s in scans] == ["x", "y"]  # sorted by scan ID; the repeated file once
    messages = [failure_message(f) for f in failures]
    assert messages == [f"cohort {tmp_path}/missing.nii.gz: no such file or folder",
                        f"{tmp_path}/empty: folder holds no .nii or .nii.gz file"]


def test_report_links_every_figure_and_shows_the_seed_table(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.png", "sub/c.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    lines = reference_table([("this run", 0.5, None)])
    assert len(lines) == 2 + len(SEED_REFERENCE) + 1 and "| 3D CNN | 0.495 | 0.535 | seed, HCP test |" in lines
    assert lines[-1] == "| this run | 0.500 | n/a | this run |"
    text = write_report(tmp_path, "T", [("Numbers", lines)], ["b.png"]).read_text()
    assert text.index("(b.png)") < text.index("(a.png)") < text.index("(sub/c.png)")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_docstring_examples():
    import brainage_hpc.evaluation.predict as predict
    import brainage_hpc.interpret.gradcam as gradcam
    import brainage_hpc.interpret.latent as latent
    import brainage_hpc.report as report

    for module in (report, predict, latent, gradcam):
        assert doctest.testmod(module).failed == 0, module.__name__


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["evaluate", "--run-dir", "{tmp}/nope", "--shards", "{tmp}"], "brainage evaluate: error: {tmp}/nope: no such run folder"),
        (["predict", "--checkpoint", "{tmp}/nope", "--input", "x.nii.gz"], "brainage predict: error: {tmp}/nope: no such run folder"),
        (["gradcam", "--run-dir", "{tmp}/nope", "--shards", "{tmp}"], "brainage gradcam: error: {tmp}/nope: no such run folder"),
        (["latent", "--run-dir", "{tmp}/nope", "--shards", "{tmp}"], "brainage latent: error: {tmp}/nope: no such run folder"),
        (["generate", "--run-dir", "{tmp}", "--age", "25", "--sex", "F", "--n", "0", "--out", "{tmp}/g"], "brainage generate: error: --n must be >= 1"),
        (["evaluate", "--run-dir", "{tmp}", "--shards", "{tmp}"], "brainage evaluate: error: {tmp}: no checkpoint"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, expect):
    rc = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(expect.format(tmp=tmp_path)) and "\n" not in err, err
