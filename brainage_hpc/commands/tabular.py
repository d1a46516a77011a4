r"""``brainage tabular``: age group / age from a FreeSurfer table, with feature importance.

Example::

    brainage tabular --table cohort/freesurfer.csv --hcp-root cohort \
        --manifest shards/manifest.json --task classify4 --model hgb --out runs/tab_c4

Writes into ``--out`` (each file atomically): ``metrics.json`` (metric names of
:mod:`brainage_hpc.evaluation.metrics`, plus the baseline), ``predictions.csv``,
``importance.csv``, ``importance.png`` and ``report.md``.

Exit codes: 0 success; 2 bad input (missing file, unreadable or inconsistent
table/labels/manifest, unknown or unavailable model), reported as one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_hpc.outputs import prepare_output_dir

__all__ = ["add_arguments", "run", "run_tabular"]

log = logging.getLogger(__name__)
MIN_TRAIN = 10  # subjects in the train split below which `tabular` refuses to fit (U6)

_N_CLASSES = {"classify4": 4, "classify2": 2, "regress": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainage tabular``."""
    from brainage_hpc.tabular.models import MODEL_NAMES

    parser.add_argument("--table", required=True, help="FreeSurfer CSV: Subject + numeric regional measures")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hcp-root", help="folder with unrestricted*.csv (and restricted*.csv for exact ages/families)")
    src.add_argument("--labels", help="CSV with Subject and Age_in_Yrs/Age/age_bin (+ Gender, Family_ID)")
    parser.add_argument("--manifest", help="shards' manifest.json: use its train/val/test split")
    parser.add_argument(
        "--task",
        required=True,
        choices=list(_N_CLASSES),
        help="classify4: the 4 HCP age bins; classify2: <31 vs >=31; regress: age in years (needs exact ages)",
    )
    parser.add_argument("--model", default="hgb", choices=list(MODEL_NAMES), help="default: hgb")
    parser.add_argument(
        "--search-iters", type=int, default=10, help="random-search settings tried on val (0: defaults)"
    )
    parser.add_argument("--n-repeats", type=int, default=10, help="permutation-importance shuffles per feature")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (without --manifest), search and model")
    parser.add_argument("--jobs", type=int, default=1, help="threads for rf/xgb/lgbm and permutation importance")
    parser.add_argument("--out", required=True, help="output folder")


def _predict(model: Any, X: np.ndarray, n_classes: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    pred = model.predict(X)
    if n_classes is None or not hasattr(model, "predict_proba"):
        return np.asarray(pred), None
    proba = np.zeros((len(X), n_classes))
    proba[:, np.asarray(model.classes_, dtype=int)] = model.predict_proba(X)
    return np.asarray(pred), proba


def run_tabular(
    table: str | Path,
    out: str | Path,
    task: str,
    hcp_root: str | Path | None = None,
    labels: str | Path | None = None,
    manifest: str | Path | None = None,
    model: str = "hgb",
    search_iters: int = 10,
    seed: int = 0,
    n_repeats: int = 10,
    jobs: int = 1,
) -> dict[str, Any]:
    """Load, split, search, evaluate, explain, and write the five output files.

    Args: as the command-line options of the same names.

    Returns:
        The dict written to ``metrics.json``.

    Raises:
        FileNotFoundError: a missing input file.
        TabularDataError: bad input data, options or model choice (one-line message).
    """
    from brainage_hpc.evaluation.metrics import apply_bias_correction, fit_bias_correction, regression_metrics
    from brainage_hpc.report import atomic_path, write_json
    from brainage_hpc.tabular.data import (
        TabularDataError,
        join_labels,
        read_feature_table,
        read_labels,
        task_targets,
    )
    from brainage_hpc.tabular.importance import importance_figure, importance_table
    from brainage_hpc.tabular.models import build_model, search_on_validation
    from brainage_hpc.tabular.report import render_report
    from brainage_hpc.tabular.splits import resolve_splits

    if task not in _N_CLASSES:
        raise TabularDataError(f"unknown task '{task}' (valid: {', '.join(_N_CLASSES)})")
    for name, value, low in (("--search-iters", search_iters, 0), ("--n-repeats", n_repeats, 2), ("--jobs", jobs, 1)):
        if value < low:
            raise TabularDataError(f"{name} must be >= {low}, got {value}")
    n_classes = _N_CLASSES[task]
    try:
        spec = build_model(model, task, seed=seed, n_jobs=jobs)
    except ValueError as exc:
        raise TabularDataError(str(exc)) from None

    table = Path(table)
    features, notes = read_feature_table(table)
    label_frame, label_notes = read_labels(hcp_root, labels)
    data = join_labels(features, label_frame, task, table_name=table.name)  # type: ignore[arg-type]
    data.notes[:0] = notes + label_notes
    splits, split_source = resolve_splits(data, manifest, seed=seed)
    y_all = task_targets(data.labels, task)  # type: ignore[arg-type]
    pos = {s: i for i, s in enumerate(data.labels.index)}
    idx = {k: np.array([pos[s] for s in v], dtype=int) for k, v in splits.items()}
    X_all = data.features.to_numpy(dtype=float)
    X = {k: X_all[i] for k, i in idx.items()}
    y = {k: y_all[i] for k, i in idx.items()}
    if len(y["train"]) < MIN_TRAIN or not len(y["test"]):
        raise TabularDataError(
            f"{table}: {len(y['train'])} training and {len(y['test'])} test subjects after joining labels; "
            f"need >= {MIN_TRAIN} and >= 1 (a model of a handful of subjects reports a number, not a result)"
        )
    if n_classes is not None and len(np.unique(y["train"])) < 2:
        raise TabularDataError(
            f"the train split holds a single class ({int(y['train'][0])}); cannot train a classifier"
        )
    log.info("%s: %d features; train %d, val %d, test %d", table.name, X_all.shape[1], *(len(y[k]) for k in idx))

    result = search_on_validation(spec, X["train"], y["train"], X["val"], y["val"], n_classes, search_iters, seed)
    pred: dict[str, np.ndarray] = {}
    proba: dict[str, np.ndarray | None] = {}
    for k in idx:
        pred[k], proba[k] = _predict(result.model, X[k], n_classes) if len(idx[k]) else (np.array([]), None)
    bins = {k: data.labels["age_bin"].to_numpy(dtype=np.int64)[i] for k, i in idx.items()}
    ages = {k: data.labels["age"].to_numpy(dtype=float)[i] for k, i in idx.items()}

    metrics: dict[str, Any] = {
        "task": task,
        "model": model,
        "seed": seed,
        "table": str(table),
        "label_source": str(hcp_root if hcp_root is not None else labels),
        "n_features": int(X_all.shape[1]),
        "n_split": {k: int(len(idx[k])) for k in idx},
        "split_source": split_source,
        "params": result.params,
        "search": {
            "n_iter": search_iters,
            "score_name": result.score_name,
            "val_score": result.val_score,
            "trials": result.trials,
        },
        "split": "test",
        **_split_metrics(task, y["test"], pred["test"], bins["test"]),
        "baselines": _baselines(task, bins, ages),
    }
    corrected = None
    if not len(idx["val"]):
        data.notes.append("no validation subjects: hyper-parameters left at their defaults, no bias correction")
    if task == "regress":
        try:
            alpha, beta = fit_bias_correction(y["val"], pred["val"])
        except ValueError as exc:
            metrics["bias_correction"] = {"skipped": f"cannot fit on the validation split: {exc}"}
            if len(idx["val"]):
                data.notes.append(f"bias correction skipped: {exc}")
        else:
            corrected = {k: apply_bias_correction(pred[k], alpha, beta) for k in idx}
            metrics["bias_correction"] = {"alpha": alpha, "beta": beta, "fitted_on": "val", "n_fit": len(idx["val"])}
            reg = regression_metrics(y["test"], corrected["test"])
            metrics["regression_bias_corrected"] = {**reg, "alpha": alpha, "beta": beta}
    else:
        metrics["bias_correction"] = {"skipped": "classification task: no age prediction to correct"}
    metrics["val"] = _split_metrics(task, y["val"], pred["val"], bins["val"]) if len(idx["val"]) else None

    names = [str(c) for c in data.features.columns]
    importance = importance_table(
        result.model, X["test"], y["test"], names, n_classes is None, n_repeats=n_repeats, seed=seed, n_jobs=jobs
    )
    metrics["importance"] = {
        "split": "test",
        "scoring": "mae" if n_classes is None else "balanced_accuracy",
        "n_repeats": n_repeats,
        "top10": importance["feature"].head(10).tolist(),
    }
    metrics["data_notes"] = list(data.notes)

    frames = [
        _prediction_frame(
            task, data.labels.iloc[idx[k]], k, pred[k], proba[k], None if corrected is None else corrected[k]
        )
        for k in idx
    ]
    out = prepare_output_dir(out, "tabular folder")
    write_json(out / "metrics.json", metrics)
    with atomic_path(out / "predictions.csv") as tmp:
        pd.concat(frames, ignore_index=True).to_csv(tmp, index=False)
    with atomic_path(out / "importance.csv") as tmp:
        importance.to_csv(tmp, index=False)
    xlabel = "increase of test MAE (years)" if n_classes is None else "drop of test balanced accuracy"
    fig = importance_figure(importance, top=20, xlabel=xlabel)
    with atomic_path(out / "importance.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(render_report(metrics, importance, data.notes))
    log.info("wrote metrics.json, predictions.csv, importance.csv, importance.png, report.md to %s", out)
    return metrics


def _split_metrics(task: str, y: np.ndarray, pred: np.ndarray, bins: np.ndarray) -> dict[str, Any]:
    """``brainage evaluate``'s layout for one split: ``n``, ``classification``, ``regression``.

    A regressor's ages are also scored as age bins (``4class``/``2class``), as evaluate
    does for deep regressors; a 4-class model is also scored on the 2-class task.
    """
    from brainage_hpc.data.ages import age_to_bin
    from brainage_hpc.evaluation.metrics import classification_metrics, regression_metrics

    out: dict[str, Any] = {"n": int(len(y)), "classification": {}, "regression": None}
    if task == "regress":
        out["regression"] = regression_metrics(y, pred)
        pred_bins = np.array([age_to_bin(float(a)) for a in pred], dtype=np.int64)
    elif task == "classify4":
        pred_bins = pred.astype(np.int64)
    else:
        out["classification"]["2class"] = classification_metrics(y, pred, 2)
        return out
    out["classification"]["4class"] = classification_metrics(bins, pred_bins, 4)
    out["classification"]["2class"] = classification_metrics(bins >= 2, pred_bins >= 2, 2)
    return out


def _baselines(task: str, bins: dict[str, np.ndarray], ages: dict[str, np.ndarray]) -> dict[str, Any]:
    """Majority training class / mean training age, scored on the test split."""
    from brainage_hpc.evaluation.metrics import baseline_metrics

    out: dict[str, Any] = {}
    if task == "regress":
        out["regression"] = baseline_metrics(ages["train"], ages["test"])
    if task != "classify2":
        out["4class"] = baseline_metrics(bins["train"], bins["test"], 4)
    out["2class"] = baseline_metrics(bins["train"] >= 2, bins["test"] >= 2, 2)
    return out


def _prediction_frame(
    task: str,
    labels: pd.DataFrame,
    split: str,
    pred: np.ndarray,
    proba: np.ndarray | None,
    corrected: np.ndarray | None,
) -> pd.DataFrame:
    """Rows of ``predictions.csv`` for one split, with ``brainage evaluate``'s column names."""
    from brainage_hpc.data.ages import age_to_bin

    n = len(labels)
    empty = pd.array([pd.NA] * n, dtype="Int64")
    frame = pd.DataFrame(
        {
            "subject_id": labels.index,
            "split": split,
            "sex": labels["sex"].astype("Int64").to_numpy(),
            "age": labels["age"].to_numpy(),
            "age_bin": labels["age_bin"].to_numpy(),
            "class2": (labels["age_bin"].to_numpy() >= 2).astype(np.int64),
            "pred_age": pred if task == "regress" else np.full(n, np.nan),
            "pred_age_corrected": corrected if corrected is not None else np.full(n, np.nan),
        }
    )
    if task == "regress":
        bins = np.array([age_to_bin(float(a)) for a in pred], dtype=np.int64)
        frame["age_bin_pred"], frame["class2_pred"] = bins, (bins >= 2).astype(np.int64)
    elif task == "classify4":
        frame["age_bin_pred"], frame["class2_pred"] = pred.astype(np.int64), (pred >= 2).astype(np.int64)
    else:
        frame["age_bin_pred"], frame["class2_pred"] = empty, pred.astype(np.int64)
    if proba is not None:
        for c in range(proba.shape[1]):
            frame[f"prob_{c}"] = proba[:, c]
    return frame


def run(args: argparse.Namespace) -> int:
    """Entry point of ``brainage tabular``; returns the exit code (0 ok, 2 bad input)."""
    from brainage_hpc.tabular.data import TabularDataError
    from brainage_hpc.tabular.report import headline

    try:
        metrics = run_tabular(
            table=args.table,
            out=args.out,
            task=args.task,
            hcp_root=args.hcp_root,
            labels=args.labels,
            manifest=args.manifest,
            model=args.model,
            search_iters=args.search_iters,
            seed=args.seed,
            n_repeats=args.n_repeats,
            jobs=args.jobs,
        )
    except (TabularDataError, FileNotFoundError) as exc:
        print(f"brainage tabular: error: {exc}", file=sys.stderr)
        return 2
    test, base = headline(metrics)
    key = "mae" if args.task == "regress" else "f1_micro"
    print(f"test {key} {test[key]:.3f} (baseline {base[key]:.3f}); outputs in {args.out}")
    return 0
