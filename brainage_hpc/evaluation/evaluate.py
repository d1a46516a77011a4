"""``brainage evaluate``: predictions over a split, metrics, age-bias correction, plots, report.

Outputs (default folder ``RUN/eval-<split>``):

* ``predictions.csv``: one row per subject: ``subject_id, sex, age, age_bin, class2,
  pred_age, pred_age_corrected, age_bin_pred, class2_pred, prob_0..prob_{K-1}``
  (``age`` empty when only the bin is known; ``age_bin_pred`` empty for 2-class models;
  ``prob_*`` only for classifiers), then, when the run has a calibration (``calibration.json``,
  else one fitted on the fly and written beside the outputs), ``age_lower``/``age_upper``
  (90 % conformal interval), ``ood_score``/``ood_flag``; an ensemble adds ``ensemble_sd`` and
  ``member_<i>_age``;
* ``metrics.json``: ``classification`` (``4class``/``2class``: accuracy, micro/macro F1,
  balanced accuracy, confusion matrix), ``regression`` (MAE, RMSE, R², Pearson r on the
  subjects with an exact age), ``bias_correction`` (``alpha``, ``beta`` of
  ``pred = alpha * age + beta`` fitted on the validation split) and
  ``regression_bias_corrected`` (the same metrics of ``(pred - beta) / alpha``),
  ``baselines`` (majority training class, mean training age), and ``trust``
  (:mod:`brainage_hpc.evaluation.trust`: uncorrected vs corrected vs baseline MAE and r with
  bootstrap 95 % CIs, gap-age correlation before/after, per-bin bias, interval coverage and
  median width, OOD flag rate, members' MAE);
* ``pred_vs_true.png``, ``confusion_4class.png``/``confusion_2class.png``,
  ``error_per_bin.png`` and ``report.md`` (with the seed's reference table).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_hpc.data.shards import Manifest
from brainage_hpc.evaluation.predict import LoadedModel
from brainage_hpc.outputs import prepare_output_dir

__all__ = [
    "add_calibrated_columns",
    "compute_metrics",
    "evaluate_run",
    "fit_run_calibration",
    "predict_split",
    "predict_split_features",
    "split_targets",
]

log = logging.getLogger(__name__)
_BIN_LABELS = ("22-25", "26-30", "31-35", "36+")


def split_targets(manifest: Manifest, split: str) -> pd.DataFrame:
    """Targets of a split from the manifest alone (no volume read).

    Returns:
        DataFrame with ``subject_id``, ``sex`` (0 F, 1 M), ``age`` (years, NaN when only the
        bin is known), ``age_bin`` (4-class seed bin) and ``class2`` (0: <31, 1: >=31).
    """
    ids = manifest.split_ids(split)
    rows = [manifest.subjects[s] for s in ids]
    bins = np.array([int(r["age_bin"]) for r in rows], dtype=np.int64)
    return pd.DataFrame({
        "subject_id": ids,
        "sex": [int(r["sex"]) for r in rows],
        "age": [np.nan if r.get("age") is None else float(r["age"]) for r in rows],
        "age_bin": bins,
        "class2": (bins >= 2).astype(np.int64),
    })


def predict_split(lm: LoadedModel, manifest: Manifest, split: str, batch_size: int = 4) -> pd.DataFrame:
    """Run the model over every subject of a split.

    Args:
        lm: model from :func:`~brainage_hpc.evaluation.predict.load_model`.
        manifest: the shards' manifest.
        split: split name (``train``, ``val``, ``test``).
        batch_size: volumes per forward pass.

    Returns:
        :func:`split_targets` plus ``pred_age`` (years), ``age_bin_pred`` (nullable int),
        ``class2_pred`` and, for classifiers, ``prob_0``..``prob_{K-1}``; for an ensemble also
        ``ensemble_sd`` and ``member_<i>_age``.
    """
    return predict_split_features(lm, manifest, split, batch_size)[0]


def predict_split_features(lm: LoadedModel, manifest: Manifest, split: str,
                           batch_size: int = 4) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`predict_split` and the penultimate features (N, F) ((N, 0) when the model gives none)."""
    from torch.utils.data import DataLoader

    from brainage_hpc.data.dataset import ShardDataset
    from brainage_hpc.evaluation.predict import predict_batch

    ds = ShardDataset(manifest, split, task=lm.task)
    loader = DataLoader(ds, batch_size=max(1, batch_size), shuffle=False, num_workers=0)
    parts: dict[str, list[np.ndarray]] = {"pred_age": [], "bin4_pred": [], "class2_pred": [], "probs": [],
                                          "features": [], "member_ages": []}
    ids: list[str] = []
    for batch in loader:
        out = predict_batch(lm, batch["image"], batch["sex"])
        ids += list(batch["subject_id"])
        for k in parts:
            if k in out:
                parts[k].append(out[k])
    df = split_targets(manifest, split)
    if ids != df["subject_id"].tolist():  # the dataset keeps the manifest's order
        raise RuntimeError("internal error: prediction order differs from the split order")
    df["pred_age"] = np.concatenate(parts["pred_age"])
    bin4 = np.concatenate(parts["bin4_pred"])
    df["age_bin_pred"] = pd.array(np.where(bin4 >= 0, bin4, 0), dtype="Int64")
    df.loc[bin4 < 0, "age_bin_pred"] = pd.NA
    df["class2_pred"] = np.concatenate(parts["class2_pred"]).astype(np.int64)
    probs = np.concatenate(parts["probs"])
    for k in range(probs.shape[1]):
        df[f"prob_{k}"] = probs[:, k]
    if parts["member_ages"]:
        members = np.concatenate(parts["member_ages"])  # (N, M)
        df["ensemble_sd"] = members.std(1, ddof=1) if members.shape[1] > 1 else 0.0
        for i in range(members.shape[1]):
            df[f"member_{i}_age"] = members[:, i]
    feats = np.concatenate(parts["features"]) if parts["features"] else np.zeros((len(df), 0))
    return df, feats


def fit_run_calibration(lm: LoadedModel, manifest: Manifest, batch_size: int = 4,
                        val: tuple[pd.DataFrame, np.ndarray] | None = None) -> dict[str, Any]:
    """Fit ``calibration.json`` (:mod:`~brainage_hpc.evaluation.calibration`) for ``lm`` on the shards.

    Bias and conformal on the validation split, the OOD covariance on the train split.

    Raises:
        ValueError: the shards have no train or validation split, or a prediction is not finite.
    """
    from brainage_hpc.evaluation.calibration import fit_calibration
    from brainage_hpc.evaluation.exported import ExportedModule, model_digest
    from brainage_hpc.models.features import penultimate_module

    val_name, train_name = lm.cfg.data.val_split, lm.cfg.data.train_split
    for name in (val_name, train_name):
        if not manifest.splits.get(name):
            raise ValueError(f"{manifest.root}/manifest.json: no '{name}' split (or it is empty); cannot calibrate")
    vdf, vfeat = val if val is not None else predict_split_features(lm, manifest, val_name, batch_size)
    if not np.isfinite(vdf["pred_age"].to_numpy(float)).all():
        bad = vdf.loc[~np.isfinite(vdf["pred_age"].to_numpy(float)), "subject_id"].tolist()
        raise ValueError(f"{manifest.root}: the model gives non-finite ages on validation subjects {bad[:3]}; cannot calibrate")
    _, tfeat = predict_split_features(lm, manifest, train_name, batch_size)
    has_feats = vfeat.shape[1] > 0
    inner = lm.model.members[0] if lm.members else lm.model
    layer = getattr(type(inner), "penultimate", "") if penultimate_module(inner) is not None else "features"
    model = {"digest": None if isinstance(lm.model, ExportedModule) else model_digest(lm.model), "step": lm.step,
             "name": lm.name, "source": str(lm.source)}
    if lm.members:
        model["members"] = list(lm.members)
    return fit_calibration(
        vdf["age"].to_numpy(float), vdf["pred_age"].to_numpy(float), tfeat if has_feats else None,
        vfeat if has_feats else None, vdf["ensemble_sd"].to_numpy(float) if "ensemble_sd" in vdf else None,
        layer=layer, model=model,
        fitted_on={"shards": str(manifest.root), "train_split": train_name, "val_split": val_name},
    )


def add_calibrated_columns(df: pd.DataFrame, feats: np.ndarray, cal: dict[str, Any] | None) -> pd.DataFrame:
    """``age_lower``, ``age_upper``, ``ood_score``, ``ood_flag`` of :func:`~brainage_hpc.evaluation.calibration.apply_calibration`."""
    from brainage_hpc.evaluation.calibration import apply_calibration

    sd = df["ensemble_sd"].to_numpy(float) if "ensemble_sd" in df else None
    cols = apply_calibration(cal, df["pred_age"].to_numpy(float), feats if feats.shape[1] else None, sd)
    for k, v in cols.items():
        df[k] = v
    return df


def _finite_age(df: pd.DataFrame) -> pd.DataFrame:
    return df[np.isfinite(df["age"].to_numpy(float)) & np.isfinite(df["pred_age"].to_numpy(float))]


def compute_metrics(
    pred: pd.DataFrame, val: pd.DataFrame | None, train: pd.DataFrame
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Metrics of a predictions table (pure: no model, no files).

    Args:
        pred: predictions of the evaluated split (columns of :func:`predict_split`).
        val: predictions of the validation split (for the bias correction), or ``None``.
        train: targets of the training split (:func:`split_targets`), for the baselines.

    Returns:
        (metrics dict as written to ``metrics.json`` minus the run fields,
        bias-corrected ages (N,) or ``None`` when no correction could be fitted).
    """
    from brainage_hpc.evaluation.metrics import (
        apply_bias_correction,
        baseline_metrics,
        classification_metrics,
        fit_bias_correction,
        regression_metrics,
    )

    metrics: dict[str, Any] = {"n": len(pred), "classification": {}, "baselines": {}}
    if pred["age_bin_pred"].notna().all():
        metrics["classification"]["4class"] = classification_metrics(
            pred["age_bin"].to_numpy(int), pred["age_bin_pred"].to_numpy(int), 4
        )
        metrics["baselines"]["4class"] = baseline_metrics(train["age_bin"].to_numpy(int), pred["age_bin"].to_numpy(int), 4)
    metrics["classification"]["2class"] = classification_metrics(
        pred["class2"].to_numpy(int), pred["class2_pred"].to_numpy(int), 2
    )
    metrics["baselines"]["2class"] = baseline_metrics(train["class2"].to_numpy(int), pred["class2"].to_numpy(int), 2)

    known = _finite_age(pred)
    metrics["regression"] = None
    metrics["regression_bias_corrected"] = None
    corrected: np.ndarray | None = None
    train_ages = train["age"].to_numpy(float)
    train_ages = train_ages[np.isfinite(train_ages)]
    if len(known):
        metrics["regression"] = regression_metrics(known["age"].to_numpy(float), known["pred_age"].to_numpy(float))
        if train_ages.size:
            metrics["baselines"]["regression"] = baseline_metrics(train_ages, known["age"].to_numpy(float))
    else:
        metrics["regression_skipped"] = "no subject of this split has an exact age (only age bins are known)"
    fit = _finite_age(val) if val is not None else None
    if fit is None:
        metrics["bias_correction"] = {"skipped": "no validation split to fit it on"}
    else:
        try:
            alpha, beta = fit_bias_correction(fit["age"].to_numpy(float), fit["pred_age"].to_numpy(float))
        except ValueError as exc:
            metrics["bias_correction"] = {"skipped": f"cannot fit on the validation split: {exc}"}
        else:
            metrics["bias_correction"] = {"alpha": alpha, "beta": beta, "fitted_on": "val", "n_fit": len(fit)}
            if alpha < 0.1:
                metrics["bias_correction"]["warning"] = (
                    f"slope alpha={alpha:.3g} < 0.1: the predictions barely follow age, so corrected ages are unstable"
                )
            corrected = apply_bias_correction(pred["pred_age"].to_numpy(float), alpha, beta)
            if len(known):
                mask = pred.index.isin(known.index)
                reg = regression_metrics(known["age"].to_numpy(float), corrected[mask])
                metrics["regression_bias_corrected"] = {**reg, "alpha": alpha, "beta": beta}
    return metrics, corrected


# ----------------------------------------------------------------------------- plots


def _plot_pred_vs_true(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainage_hpc.report import save_figure

    known = _finite_age(df)
    fig, ax = plt.subplots(figsize=(5, 5))
    if len(known):
        age = known["age"].to_numpy(float)
        ax.scatter(age, known["pred_age"], s=18, alpha=0.8, label="predicted")
        if "pred_age_corrected" in known and known["pred_age_corrected"].notna().any():
            ax.scatter(age, known["pred_age_corrected"], s=18, alpha=0.8, marker="x", label="bias-corrected")
        lo = float(min(age.min(), np.nanmin(known["pred_age"]))) - 1
        hi = float(max(age.max(), np.nanmax(known["pred_age"]))) + 1
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no exact ages in this split", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("predicted age (years)")
    ax.set_title(title)
    save_figure(fig, path)


def _plot_confusion(cm: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainage_hpc.report import save_figure

    arr = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4 + 0.4 * len(labels), 4))
    ax.imshow(arr, cmap="Blues")
    for (i, j), v in np.ndenumerate(arr):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > arr.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)


def _plot_bin_error(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainage_hpc.report import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = sorted(int(b) for b in df["age_bin"].unique())
    known = _finite_age(df)
    if len(known):  # signed error (brain-age delta) per true bin
        cols = [("pred_age", "raw")]
        if "pred_age_corrected" in known and known["pred_age_corrected"].notna().any():
            cols.append(("pred_age_corrected", "bias-corrected"))
        width = 0.8 / len(cols)
        for c, (col, label) in enumerate(cols):
            data = [(known[col] - known["age"])[known["age_bin"] == b].to_numpy(float) for b in bins]
            pos = [i + (c - (len(cols) - 1) / 2) * width for i in range(len(bins))]
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, medianprops={"color": "black"})
            for patch in bp["boxes"]:
                patch.set_facecolor(f"C{c}")
            ax.plot([], [], color=f"C{c}", lw=6, label=label)
        ax.axhline(0, color="k", lw=1, ls="--")
        ax.set_ylabel("predicted − true age (years)")
        ax.legend()
    else:  # no exact ages: classification error per true bin
        err = [float((df["age_bin_pred"][df["age_bin"] == b] != b).mean()) for b in bins]
        ax.bar(range(len(bins)), err)
        ax.set_ylabel("misclassified fraction")
    ax.set_xticks(range(len(bins)), [f"{_BIN_LABELS[b]}\n(n={int((df['age_bin'] == b).sum())})" for b in bins])
    ax.set_xlabel("true age bin")
    ax.set_title(title)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- run


def _append_report(path: Path, lines: list[str]) -> None:
    from brainage_hpc.report import atomic_path

    text = path.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")



def evaluate_run(
    run: str | Path | Sequence[str | Path],
    shards: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int = 4,
    device: str | None = None,
    calibration: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on one split and write every output (see the module docstring).

    Args:
        run: run folder (plain or DeepSpeed) or exported ``model.pt``; several (or a sweep folder): an ensemble.
        shards: shard folder (holds ``manifest.json``).
        split: split to evaluate.
        out: output folder; default ``RUN/eval-<split>``.
        batch_size: volumes per forward pass.
        device: torch device; default CUDA when available.
        calibration: a ``calibration.json`` to use; default the run's (or the sweep folder's), else one
            fitted on the fly on the validation split and written to the output folder.

    Returns:
        The dict written to ``metrics.json``.

    Raises:
        FileNotFoundError: missing run or shards.
        ValueError: unknown split, a model/shard shape mismatch, or an unusable checkpoint.
    """
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.ensemble import load_models
    from brainage_hpc.evaluation.trust import trust_lines, trust_metrics
    from brainage_hpc.report import write_csv, write_json

    runs = [run] if isinstance(run, (str, Path)) else list(run)
    lm = load_models(runs, device, calibration)
    run = runs[0] if len(runs) == 1 else " ".join(map(str, runs))
    manifest = load_manifest(shards)
    if tuple(manifest.shape) != tuple(lm.shape):
        raise ValueError(f"{manifest.root}: shards have shape {tuple(manifest.shape)}, the model was trained on {lm.shape}")
    if split not in manifest.splits:
        raise ValueError(f"{manifest.root}/manifest.json: no split '{split}'. Valid: {', '.join(sorted(manifest.splits))}")
    if lm.members:  # ensemble: beside the sweep folder or the members' common parent
        import os

        run_dir = Path(runs[0]) if len(runs) == 1 else Path(os.path.commonpath([str(Path(m).resolve()) for m in lm.members]))
        out_dir = Path(out) if out else run_dir / f"eval-{split}-ensemble"
    else:
        run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
        out_dir = Path(out) if out else run_dir / f"eval-{split}"
    prepare_output_dir(out_dir, "evaluation folder")

    pred, feats = predict_split_features(lm, manifest, split, batch_size)
    val_name, train_name = lm.cfg.data.val_split, lm.cfg.data.train_split
    val = val_feats = None
    if val_name in manifest.splits and manifest.splits[val_name]:
        val, val_feats = (pred, feats) if val_name == split else predict_split_features(lm, manifest, val_name, batch_size)
    train = split_targets(manifest, train_name) if manifest.splits.get(train_name) else split_targets(manifest, split)
    metrics, corrected = compute_metrics(pred, val, train)
    pred.insert(pred.columns.get_loc("pred_age") + 1, "pred_age_corrected", np.nan if corrected is None else corrected)
    cal, cal_source = lm.calibration, "run"
    if cal is None and val is not None and manifest.splits.get(train_name):
        try:
            cal = fit_run_calibration(lm, manifest, batch_size, (val, val_feats))  # type: ignore[arg-type]
        except ValueError as exc:
            log.warning("evaluate: no calibration: %s", exc)
        else:
            cal_source = "fitted on the fly (no calibration.json)"
            from brainage_hpc.evaluation.calibration import write_calibration

            write_calibration(out_dir / "calibration.json", cal)
    add_calibrated_columns(pred, feats, cal)
    train_ages = train["age"].to_numpy(float)
    train_ages = train_ages[np.isfinite(train_ages)]
    trust = trust_metrics(pred, cal, float(train_ages.mean()) if train_ages.size else None, _BIN_LABELS)
    trust["calibration_source"] = cal_source if cal is not None else None
    if trust["n_nonfinite_predictions"]:
        log.warning("evaluate: %d non-finite predictions", trust["n_nonfinite_predictions"])
    header = {
        "run": str(run), "shards": str(manifest.root), "split": split, "model": lm.name, "task": lm.task,
        "step": lm.step, "val_split": val_name if val is not None else None,
        "train_split_for_baselines": train_name if manifest.splits.get(train_name) else split,
    }
    if lm.members:
        header["members"] = list(lm.members)
    metrics = {**header, **metrics, "trust": trust}

    write_csv(out_dir / "predictions.csv", list(pred.columns), pred.astype(object).where(pred.notna(), None).values.tolist())
    write_json(out_dir / "metrics.json", metrics)
    tag = f"{lm.name} ({lm.task}), {split}"
    figures = ["pred_vs_true.png"]
    _plot_pred_vs_true(pred, out_dir / "pred_vs_true.png", f"Predicted vs true age: {tag}")
    for key, labels in (("4class", list(_BIN_LABELS)), ("2class", ["<31", ">=31"])):
        if key in metrics["classification"]:
            name = f"confusion_{key}.png"
            _plot_confusion(metrics["classification"][key]["confusion_matrix"], labels, out_dir / name, f"{key}: {tag}")
            figures.append(name)
    _plot_bin_error(pred, out_dir / "error_per_bin.png", f"Error per age bin: {tag}")
    figures.append("error_per_bin.png")
    from brainage_hpc.report import write_eval_report

    write_eval_report(out_dir, metrics, figures)
    _append_report(out_dir / "report.md", trust_lines(trust))
    log.info("evaluate: %d subjects of '%s' -> %s", len(pred), split, out_dir)
    return metrics
