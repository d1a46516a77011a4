"""``brainage evaluate``: predictions over a split, metrics, age-bias correction, plots, report.

Outputs (default folder ``RUN/eval-<split>``):

* ``predictions.csv``: one row per subject: ``subject_id, sex, age, age_bin, class2,
  pred_age, pred_age_corrected, age_bin_pred, class2_pred, prob_0..prob_{K-1}``
  (``age`` empty when only the bin is known; ``age_bin_pred`` empty for 2-class models;
  ``prob_*`` only for classifiers);
* ``metrics.json``: ``classification`` (``4class``/``2class``: accuracy, micro/macro F1,
  balanced accuracy, confusion matrix), ``regression`` (MAE, RMSE, R², Pearson r on the
  subjects with an exact age), ``bias_correction`` (``alpha``, ``beta`` of
  ``pred = alpha * age + beta`` fitted on the validation split) and
  ``regression_bias_corrected`` (the same metrics of ``(pred - beta) / alpha``),
  ``baselines`` (majority training class, mean training age);
* ``pred_vs_true.png``, ``confusion_4class.png``/``confusion_2class.png``,
  ``error_per_bin.png`` and ``report.md`` (with the seed's reference table).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_hpc.data.shards import Manifest
from brainage_hpc.evaluation.predict import LoadedModel

__all__ = ["compute_metrics", "evaluate_run", "predict_split", "split_targets"]

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
        ``class2_pred`` and, for classifiers, ``prob_0``..``prob_{K-1}``.
    """
    from torch.utils.data import DataLoader

    from brainage_hpc.data.dataset import ShardDataset
    from brainage_hpc.evaluation.predict import predict_batch

    ds = ShardDataset(manifest, split, task=lm.task)
    loader = DataLoader(ds, batch_size=max(1, batch_size), shuffle=False, num_workers=0)
    parts: dict[str, list[np.ndarray]] = {"pred_age": [], "bin4_pred": [], "class2_pred": [], "probs": []}
    ids: list[str] = []
    for batch in loader:
        out = predict_batch(lm, batch["image"], batch["sex"])
        ids += list(batch["subject_id"])
        for k in parts:
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


def evaluate_run(
    run: str | Path,
    shards: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int = 4,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on one split and write every output (see the module docstring).

    Args:
        run: run folder (plain or DeepSpeed) or exported ``model.pt``.
        shards: shard folder (holds ``manifest.json``).
        split: split to evaluate.
        out: output folder; default ``RUN/eval-<split>``.
        batch_size: volumes per forward pass.
        device: torch device; default CUDA when available.

    Returns:
        The dict written to ``metrics.json``.

    Raises:
        FileNotFoundError: missing run or shards.
        ValueError: unknown split, a model/shard shape mismatch, or an unusable checkpoint.
    """
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.predict import load_model
    from brainage_hpc.report import write_csv, write_json

    lm = load_model(run, device)
    manifest = load_manifest(shards)
    if tuple(manifest.shape) != tuple(lm.shape):
        raise ValueError(f"{manifest.root}: shards have shape {tuple(manifest.shape)}, the model was trained on {lm.shape}")
    if split not in manifest.splits:
        raise ValueError(f"{manifest.root}/manifest.json: no split '{split}'. Valid: {', '.join(sorted(manifest.splits))}")
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    out_dir = Path(out) if out else run_dir / f"eval-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)

    pred = predict_split(lm, manifest, split, batch_size)
    val_name, train_name = lm.cfg.data.val_split, lm.cfg.data.train_split
    val = None
    if val_name in manifest.splits and manifest.splits[val_name]:
        val = pred if val_name == split else predict_split(lm, manifest, val_name, batch_size)
    train = split_targets(manifest, train_name) if manifest.splits.get(train_name) else split_targets(manifest, split)
    metrics, corrected = compute_metrics(pred, val, train)
    pred.insert(pred.columns.get_loc("pred_age") + 1, "pred_age_corrected", np.nan if corrected is None else corrected)
    header = {
        "run": str(run), "shards": str(manifest.root), "split": split, "model": lm.name, "task": lm.task,
        "step": lm.step, "val_split": val_name if val is not None else None,
        "train_split_for_baselines": train_name if manifest.splits.get(train_name) else split,
    }
    metrics = {**header, **metrics}

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
    log.info("evaluate: %d subjects of '%s' -> %s", len(pred), split, out_dir)
    return metrics
