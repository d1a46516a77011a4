"""brainage_hpc.tabular and ``brainage tabular`` on the synthetic cohort's FreeSurfer table.

Generating volumes costs ~1 s per subject, so the cohort here is built by
:func:`write_fast_tables`, which runs only the table part of the generator
(same demographics, same per-subject random stream, same formulas). The slow
end-to-end test (tests/integration/test_tabular_e2e.py) checks it against the
real ``brainage synth`` output value by value.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainage_hpc.cli import main
from brainage_hpc.commands.tabular import run_tabular
from brainage_hpc.data.ages import age_bin_label, age_to_bin
from brainage_hpc.ingest import synthetic as syn
from brainage_hpc.tabular import (
    TabularDataError,
    TwoStepClassifier,
    build_model,
    headline,
    importance_table,
    join_labels,
    read_feature_table,
    read_labels,
    resolve_splits,
    search_on_validation,
    task_targets,
)

N_SUBJECTS = 200
TRUTH = set(syn.AGE_DEPENDENT_FEATURES)
_ATLAS: dict[float, object] = {}


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def write_fast_tables(out: Path, n_subjects: int, seed: int = 0) -> Path:
    """The CSVs of a synthetic cohort without the volumes: a fast stand-in for the tabular tests.

    The values are the generator's noise-free quantities (what ``freesurfer.csv`` held before
    it was measured from the written volumes), so the age-dependent features are known exactly.
    """
    cfg = syn.SynthConfig(n_subjects=n_subjects, seed=seed)
    if cfg.voxel_mm not in _ATLAS:
        _ATLAS[cfg.voxel_mm] = syn._build_atlas(cfg)
    atlas = _ATLAS[cfg.voxel_mm]
    regions = [atlas.regions == r for r in range(len(syn.REGIONS))]
    rows = []
    for i, (subject, years, age, sex, fam, head, rate) in enumerate(syn._draw_demographics(cfg)):
        rng = np.random.default_rng([cfg.seed, i])
        yrs = max(age - 22.0, 0.0) * rate
        vent = atlas.vent_dist_mm <= cfg.ventricle_mm_per_year * yrs
        gm = atlas.gm * (1 - np.clip(cfg.gm_loss_per_year * yrs * atlas.lobe_rate, 0, 0.9))
        wm = atlas.wm.copy()
        gm[vent] = 0
        wm[vent] = 0
        vox = cfg.voxel_mm**3 * head**3
        f = {
            "IntraCranial_Vol": float(atlas.mask.sum() * vox),
            "LatVent_Vol": float((atlas.vent_mask | vent).sum() * vox),
            "TotalGray_Vol": float(gm.sum() * vox),
            "CerebralWhiteMatter_Vol": float(wm.sum() * vox),
        }
        for r, name in enumerate(syn.REGIONS):
            g = float(gm[regions[r]].sum() * vox)
            w = float(atlas.wm[regions[r]].sum() * vox)
            thick = 2.7 * head * (1 - cfg.gm_loss_per_year * yrs * syn._LOBE_ATROPHY[name.split("_")[1]])
            f[f"{name}_GrayVol"] = g * (1 + 0.02 * rng.standard_normal())
            f[f"{name}_ThickAvg"] = thick * (1 + 0.02 * rng.standard_normal())
            f[f"{name}_WhiteVol"] = w * (1 + 0.03 * rng.standard_normal())
        for k in range(cfg.n_noise_features):
            f[f"Misc_{k:02d}_Vol"] = float(1000 * (1 + 0.2 * rng.standard_normal()))
        rows.append((subject, years, sex, fam, f))
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(
        out / "unrestricted.csv",
        ["Subject", "Gender", "Age"],
        [[s, x, age_bin_label(age_to_bin(y))] for s, y, x, _, _ in rows],
    )
    _write_csv(out / "restricted.csv", ["Subject", "Age_in_Yrs", "Family_ID"], [[s, y, fm] for s, y, _, fm, _ in rows])
    names = list(rows[0][4])
    _write_csv(out / "freesurfer.csv", ["Subject", *names], [[s] + [f"{f[k]:.4f}" for k in names] for s, *_, f in rows])
    (out / "truth.json").write_text(json.dumps({"age_dependent_features": list(syn.AGE_DEPENDENT_FEATURES)}))
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fast_tables(tmp_path_factory.mktemp("tab_cohort"), N_SUBJECTS, seed=0)


def _cli(*args: object) -> int:
    return main(["tabular", *(str(a) for a in args)])


def _variant(cohort: Path, tmp_path: Path, edit) -> Path:
    """Copy of the cohort's table with ``edit(df)`` applied (df: all columns as text)."""
    df = pd.read_csv(cohort / "freesurfer.csv", dtype=str)
    edit(df)
    path = tmp_path / "freesurfer_edited.csv"
    df.to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------- acceptance


def test_regression_beats_mean_and_ranks_age_features(cohort, tmp_path):
    m = run_tabular(cohort / "freesurfer.csv", tmp_path, "regress", hcp_root=cohort, search_iters=3, n_repeats=5)
    test, base = headline(m)
    assert test["mae"] < 0.5 * base["mae"], (test, base)
    top = m["importance"]["top10"]
    # the age-dependent measures lead; head-size proxies (WhiteVol) may follow as covariates
    assert set(top[:4]) <= TRUTH and sum(f in TRUTH for f in top) >= 5, top
    assert m["bias_correction"]["fitted_on"] == "val" and m["regression_bias_corrected"]["mae"] > 0
    assert m["classification"]["4class"]["n"] == m["n"] == m["n_split"]["test"]  # ages scored as bins too
    lin = run_tabular(
        cohort / "freesurfer.csv", tmp_path / "lin", "regress", hcp_root=cohort, model="linear", n_repeats=5
    )
    top = lin["importance"]["top10"]
    assert headline(lin)[0]["mae"] < 0.5 * headline(lin)[1]["mae"]
    assert set(top[:4]) <= TRUTH and not any(f.startswith("Misc_") for f in top), top


def test_classify4_beats_majority(cohort, tmp_path):
    m = run_tabular(cohort / "freesurfer.csv", tmp_path, "classify4", hcp_root=cohort, search_iters=2, n_repeats=3)
    t, b = headline(m)
    assert t["f1_micro"] > b["f1_micro"] + 0.15 and t["f1_macro"] > b["f1_macro"] + 0.2, (t, b)
    assert t["balanced_accuracy"] > b["balanced_accuracy"] + 0.15, (t, b)
    assert np.array(t["confusion_matrix"]).shape == (4, 4) and np.sum(t["confusion_matrix"]) == m["n_split"]["test"]
    assert m["classification"]["2class"]["n"] == m["n"] and "2class" in m["baselines"]


def test_xgboost_is_installed_and_beats_the_baselines(cohort, tmp_path):
    """The seed's strongest model (XGBoost, 4-class micro-F1 0.730 on HCP) is a dependency, not an option."""
    import xgboost  # noqa: F401  (a hard dependency: ImportError here is a failure, not a skip)

    m = run_tabular(cohort / "freesurfer.csv", tmp_path / "c4", "classify4", hcp_root=cohort, model="xgb",
                    search_iters=1, n_repeats=2)
    t, b = headline(m)
    assert m["model"] == "xgb" and t["f1_micro"] > b["f1_micro"] + 0.15, (t, b)
    r = run_tabular(cohort / "freesurfer.csv", tmp_path / "r", "regress", hcp_root=cohort, model="xgb",
                    search_iters=1, n_repeats=2)
    assert headline(r)[0]["mae"] < 0.6 * headline(r)[1]["mae"], headline(r)


def test_leaf_sizes_fit_a_small_training_split():
    """HGB's default leaf size (20) cannot split 24 subjects: the search caps it instead of fitting a constant."""
    from brainage_hpc.tabular.models import build_model, search_on_validation

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3))
    y = 30 + 3 * x[:, 0] + 0.1 * rng.normal(size=32)
    res = search_on_validation(build_model("hgb", "regress"), x[:24], y[:24], x[24:], y[24:], None, n_iter=2)
    assert all(t["params"].get("model__min_samples_leaf", 99) <= 6 for t in res.trials), res.trials
    assert np.std(res.model.predict(x[24:])) > 0.5  # not the training mean


def test_classify2_and_two_step(cohort, tmp_path):
    m = run_tabular(
        cohort / "freesurfer.csv", tmp_path / "c2", "classify2", hcp_root=cohort, model="linear", n_repeats=3
    )
    assert headline(m)[0]["balanced_accuracy"] > 0.75 > headline(m)[1]["balanced_accuracy"]
    two = run_tabular(
        cohort / "freesurfer.csv",
        tmp_path / "ts",
        "classify4",
        hcp_root=cohort,
        model="two-step",
        search_iters=0,
        n_repeats=2,
    )
    assert headline(two)[0]["balanced_accuracy"] > headline(two)[1]["balanced_accuracy"] + 0.15


def test_same_seed_same_metrics(cohort, tmp_path):
    kwargs = dict(hcp_root=cohort, search_iters=2, n_repeats=3, seed=7)
    a = run_tabular(cohort / "freesurfer.csv", tmp_path / "a", "regress", **kwargs)
    b = run_tabular(cohort / "freesurfer.csv", tmp_path / "b", "regress", **kwargs)
    assert a == b
    assert (tmp_path / "a" / "importance.csv").read_bytes() == (tmp_path / "b" / "importance.csv").read_bytes()
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()


def test_cli_writes_all_outputs(cohort, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _cli(
        "--table",
        cohort / "freesurfer.csv",
        "--hcp-root",
        cohort,
        "--task",
        "classify2",
        "--model",
        "linear",
        "--search-iters",
        "2",
        "--n-repeats",
        "2",
        "--out",
        out,
    )
    assert rc == 0
    assert "baseline" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    for key in ("accuracy", "f1_micro", "f1_macro", "balanced_accuracy", "confusion_matrix"):
        assert key in metrics["classification"]["2class"] and key in metrics["baselines"]["2class"]
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    assert len(pred) == N_SUBJECTS and set(pred["split"]) == {"train", "val", "test"}
    # the columns of `brainage evaluate`'s predictions.csv, plus split
    assert {"subject_id", "sex", "age", "age_bin", "class2", "class2_pred", "prob_0", "prob_1"} <= set(pred.columns)
    assert pred["pred_age"].isna().all() and pred["age_bin_pred"].isna().all()  # a 2-class model
    imp = pd.read_csv(out / "importance.csv")
    assert list(imp["rank"]) == list(range(1, metrics["n_features"] + 1))
    assert (imp["ci95_low"] <= imp["importance_mean"]).all() and (imp["importance_mean"] <= imp["ci95_high"]).all()
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Top 10 features" in report and "| balanced_accuracy |" in report
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


# ----------------------------------------------------------------------------- imperfect input


def test_missing_subjects_are_dropped_and_counted(cohort, tmp_path):
    table = _variant(cohort, tmp_path, lambda df: df.drop(index=[0, 5, 9], inplace=True))
    m = run_tabular(table, tmp_path / "o", "classify2", hcp_root=cohort, model="linear", n_repeats=2)
    assert sum(m["n_split"].values()) == N_SUBJECTS - 3
    assert any("3 labelled subject(s) missing from freesurfer_edited.csv" in n for n in m["data_notes"])
    assert "3 labelled subject(s) missing" in (tmp_path / "o" / "report.md").read_text()


def test_partly_non_numeric_column_is_a_one_line_error(cohort, tmp_path, capsys):
    def edit(df):
        df.loc[4, "LatVent_Vol"] = "12,5"

    table = _variant(cohort, tmp_path, edit)
    rc = _cli("--table", table, "--hcp-root", cohort, "--task", "regress", "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert rc == 2
    assert "freesurfer_edited.csv" in err and "'LatVent_Vol'" in err and "'12,5'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_text_and_id_columns_are_dropped_with_a_note(cohort, tmp_path):
    def edit(df):
        df["Release"] = "S1200"
        df["Scanner_ID"] = "7"
        df["Age_in_Yrs"] = "30"

    features, notes = read_feature_table(_variant(cohort, tmp_path, edit))
    assert not {"Release", "Scanner_ID", "Age_in_Yrs"} & set(features.columns)
    joined = " ".join(notes)
    assert "Release" in joined and "Scanner_ID" in joined and "Age_in_Yrs" in joined


def test_nans_are_imputed_with_the_train_median(cohort, tmp_path):
    rng = np.random.default_rng(0)

    def edit(df):
        for col in ("LatVent_Vol", "lh_frontal_sup_ThickAvg", "Misc_00_Vol"):
            df.loc[rng.random(len(df)) < 0.2, col] = ""
        df.loc[1, "TotalGray_Vol"] = "inf"
        df["Empty_Vol"] = ""

    table = _variant(cohort, tmp_path, edit)
    m = run_tabular(table, tmp_path / "o", "regress", hcp_root=cohort, search_iters=0, n_repeats=2)
    assert m["regression"]["mae"] < m["baselines"]["regression"]["mae"]
    notes = " ".join(m["data_notes"])
    assert "missing value(s)" in notes and "training-split median" in notes and "infinite" in notes
    assert "Empty_Vol" in notes
    # the imputer's medians come from the training split only
    features, _ = read_feature_table(table)
    labels, _ = read_labels(hcp_root=cohort)
    data = join_labels(features, labels, "regress")
    splits, _ = resolve_splits(data)
    X, y = data.features, task_targets(data.labels, "regress")
    train = data.labels.index.isin(splits["train"])
    val = data.labels.index.isin(splits["val"])
    res = search_on_validation(
        build_model("linear", "regress"), X[train].to_numpy(), y[train], X[val].to_numpy(), y[val], None, 0
    )
    np.testing.assert_allclose(res.model.named_steps["impute"].statistics_, np.nanmedian(X[train].to_numpy(), axis=0))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda df: df.rename(columns={"Subject": "ID_"}, inplace=True), "no 'Subject' column"),
        (lambda df: df.__setitem__("Subject", "100206"), "more than once"),
        (lambda df: df.drop(columns=[c for c in df.columns if c != "Subject"], inplace=True), "no numeric feature"),
    ],
)
def test_malformed_tables_are_one_line_errors(cohort, tmp_path, capsys, edit, message):
    table = _variant(cohort, tmp_path, edit)
    rc = _cli("--table", table, "--hcp-root", cohort, "--task", "classify4", "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "freesurfer_edited.csv" in err and "Traceback" not in err


def test_bad_sources_and_options_exit_2(cohort, tmp_path, capsys):
    table = cohort / "freesurfer.csv"
    only_bins = tmp_path / "bins"
    only_bins.mkdir()
    (only_bins / "unrestricted.csv").write_text((cohort / "unrestricted.csv").read_text())
    cases = [
        (["--table", tmp_path / "nope.csv", "--hcp-root", cohort, "--task", "regress"], "nope.csv"),
        (["--table", table, "--hcp-root", tmp_path, "--task", "regress"], "no unrestricted"),
        (["--table", table, "--hcp-root", only_bins, "--task", "regress"], "needs exact ages"),
        (["--table", table, "--hcp-root", cohort, "--task", "regress", "--model", "two-step"], "classify4"),
        (["--table", table, "--hcp-root", cohort, "--task", "regress", "--n-repeats", "1"], "--n-repeats"),
        (["--table", table, "--hcp-root", cohort, "--task", "regress", "--manifest", tmp_path / "m.json"], "m.json"),
    ]
    for args, message in cases:
        assert _cli(*args, "--out", tmp_path / "o") == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    for argv in (
        ["--table", table, "--task", "regress", "--out", tmp_path],  # no label source
        ["--table", table, "--hcp-root", cohort, "--labels", table, "--task", "regress", "--out", tmp_path],
        ["--table", table, "--hcp-root", cohort, "--task", "classify3", "--out", tmp_path],
    ):
        with pytest.raises(SystemExit) as exc:
            _cli(*argv)
        assert exc.value.code == 2


def test_optional_models_need_their_package(cohort, tmp_path, capsys):
    import importlib.util

    for model, package in (("xgb", "xgboost"), ("lgbm", "lightgbm")):
        if importlib.util.find_spec(package) is not None:
            continue
        rc = _cli(
            "--table",
            cohort / "freesurfer.csv",
            "--hcp-root",
            cohort,
            "--task",
            "regress",
            "--model",
            model,
            "--out",
            tmp_path,
        )
        assert rc == 2 and f"pip install {package}" in capsys.readouterr().err


def test_manifest_splits_and_labels_csv(cohort, tmp_path):
    subjects = pd.read_csv(cohort / "restricted.csv", dtype=str)
    ids = list(subjects["Subject"])
    manifest = tmp_path / "manifest.json"
    splits = {"train": ids[:140] + ["999999"], "val": ids[140:170], "test": ids[170:]}
    manifest.write_text(json.dumps({"shards": [], "splits": splits}))
    labels = tmp_path / "labels.csv"
    # IDs that went through a float column ("100206.0") still match the table's
    subjects[["Subject", "Age_in_Yrs"]].assign(Subject=subjects["Subject"] + ".0", Gender="F").to_csv(
        labels, index=False
    )
    m = run_tabular(
        cohort / "freesurfer.csv",
        tmp_path / "o",
        "regress",
        labels=labels,
        manifest=manifest,
        model="linear",
        n_repeats=2,
    )
    assert m["n_split"] == {"train": 140, "val": 30, "test": 30}
    assert any("999999" in n for n in m["data_notes"])
    pred = pd.read_csv(tmp_path / "o" / "predictions.csv", dtype={"subject_id": str})
    assert sorted(pred.loc[pred["split"] == "test", "subject_id"]) == sorted(ids[170:])
    assert np.isfinite(pred["pred_age"]).all() and np.isfinite(pred["pred_age_corrected"]).all()
    overlap = {"train": ids[:10], "val": ids[5:20], "test": ids[20:]}
    manifest.write_text(json.dumps({"splits": overlap}))
    with pytest.raises(TabularDataError, match="in both 'train' and 'val'"):
        run_tabular(cohort / "freesurfer.csv", tmp_path / "o", "regress", labels=labels, manifest=manifest)
    manifest.write_text(json.dumps({"shards": []}))
    with pytest.raises(TabularDataError, match="no 'splits' key"):
        run_tabular(cohort / "freesurfer.csv", tmp_path / "o", "regress", labels=labels, manifest=manifest)


def test_split_without_manifest_keeps_families_together(cohort):
    features, _ = read_feature_table(cohort / "freesurfer.csv")
    labels, _ = read_labels(hcp_root=cohort)
    data = join_labels(features, labels, "classify4")
    splits, source = resolve_splits(data, seed=3)
    assert "seed 3" in source
    assert sorted(sum(splits.values(), [])) == sorted(data.labels.index)
    family_split = {}
    for name, ids in splits.items():
        for fam in data.labels.loc[ids, "family_id"]:
            assert family_split.setdefault(fam, name) == name
    assert resolve_splits(data, seed=3)[0] == splits


# ----------------------------------------------------------------------------- components


def test_importance_finds_the_informative_feature():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    y = 3 * X[:, 2] + 0.1 * rng.normal(size=200)
    table = importance_table(Ridge().fit(X, y), X, y, ["a", "b", "c", "d"], regression=True, n_repeats=5)
    assert table.iloc[0]["feature"] == "c" and table.iloc[0]["rank"] == 1
    assert table.iloc[0]["ci95_low"] > 1.0  # MAE grows by years, not fractions
    assert table["impurity_importance"].isna().all()  # Ridge has no impurity importance
    rf = build_model("rf", "regress").pipeline.set_params(model__n_estimators=20).fit(X, y)
    assert importance_table(rf, X, y, list("abcd"), regression=True, n_repeats=2)["impurity_importance"].notna().all()


@pytest.mark.parametrize("detector", ["classifier", "isolation-forest"])
def test_two_step_predicts_the_rare_class(detector):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3], [60, 60, 60, 6])
    X = y[:, None] * 3.0 + rng.normal(size=(len(y), 3))
    model = TwoStepClassifier(detector=detector, random_state=0).fit(X, y)
    pred = model.predict(X)
    assert set(pred) <= {0, 1, 2, 3} and model.n_rare_ == 6
    assert (pred[y == 3] == 3).mean() >= 0.5 and (pred[y != 3] == 3).mean() < 0.1


def test_unknown_model_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'hgb'"):
        build_model("hbg", "regress")


def test_U6_a_three_row_table_is_refused(cohort, tmp_path, capsys):
    """Three subjects leave one to train on: a one-line error, not 'test mae 7.000' and exit 0."""
    small = _variant(cohort, tmp_path, lambda df: df.drop(df.index[3:], inplace=True))
    rc = _cli("--table", small, "--hcp-root", cohort, "--task", "regress", "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert rc == 2 and "training" in err and "need >= 10" in err and "Traceback" not in err, err
