"""Metrics shared by every model family (deep models and the FreeSurfer-table models).

One set of names, so ``metrics.json`` of ``brainage evaluate`` and of
``brainage tabular`` can be compared key by key:

* classification: ``accuracy``, ``f1_micro``, ``f1_macro``, ``balanced_accuracy``,
  ``confusion_matrix`` (rows = true class, columns = predicted class), ``n``;
* regression (ages in years): ``mae``, ``rmse``, ``r2``, ``pearson_r``, ``n``.

Brain-age predictions regress towards the mean (old subjects are predicted too
young, young ones too old). The usual correction (Smith et al. 2019; Beheshti
et al. 2019) fits ``pred = alpha * age + beta`` on the *validation* split and
reports ``(pred - beta) / alpha`` on the test split: see
:func:`fit_bias_correction` and :func:`apply_bias_correction`.

Values are plain Python floats/ints/lists so a dict goes straight into JSON.
A metric that is undefined (``pearson_r`` of a constant prediction, ``r2`` of a
single subject) is ``nan``; write JSON with :func:`json_safe` to turn it into
``null``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "apply_bias_correction",
    "baseline_metrics",
    "classification_metrics",
    "fit_bias_correction",
    "json_safe",
    "regression_metrics",
]

ArrayLike = Sequence[float] | np.ndarray


def _as_1d(values: ArrayLike, name: str, dtype: type = float) -> np.ndarray:
    arr: np.ndarray = np.asarray(values, dtype=dtype).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} have different lengths ({a.size} vs {b.size})")


def classification_metrics(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> dict[str, Any]:
    """Accuracy, micro/macro F1, balanced accuracy and the confusion matrix.

    Args:
        y_true: true class indices in ``[0, n_classes)``, shape (N,).
        y_pred: predicted class indices in ``[0, n_classes)``, shape (N,).
        n_classes: number of classes of the task (4 for the HCP age bins, 2 for <31 vs >=31).

    Returns:
        ``{"accuracy", "f1_micro", "f1_macro", "balanced_accuracy", "confusion_matrix", "n"}``.
        ``f1_micro`` equals ``accuracy`` for single-label data (the seed reports it as "F1").
        ``f1_macro`` averages the per-class F1 over the classes present in ``y_true`` or
        ``y_pred`` (scikit-learn's convention; a class absent from both is skipped, a class
        present in only one of them scores 0). ``balanced_accuracy`` is the mean recall over
        the classes present in ``y_true``. ``confusion_matrix`` is ``n_classes`` x ``n_classes``
        nested lists, rows true, columns predicted.

    Raises:
        ValueError: empty inputs, different lengths, or a label outside ``[0, n_classes)``.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    t = _as_1d(y_true, "y_true", dtype=np.int64)
    p = _as_1d(y_pred, "y_pred", dtype=np.int64)
    _same_length(t, p, "y_true and y_pred")
    for name, arr in (("y_true", t), ("y_pred", p)):
        bad = arr[(arr < 0) | (arr >= n_classes)]
        if bad.size:
            raise ValueError(f"{name} has label {int(bad[0])} outside [0, {n_classes})")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)  # true count per class
    predicted = cm.sum(axis=0).astype(float)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    accuracy = float(tp.sum() / t.size)
    return {
        "accuracy": accuracy,
        "f1_micro": accuracy,
        "f1_macro": float(f1[present].mean()),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "confusion_matrix": cm.tolist(),
        "n": int(t.size),
    }


def regression_metrics(age_true: ArrayLike, age_pred: ArrayLike) -> dict[str, Any]:
    """MAE, RMSE, R² and Pearson r of predicted ages (years).

    Args:
        age_true: chronological ages in years, shape (N,).
        age_pred: predicted ages in years, shape (N,).

    Returns:
        ``{"mae", "rmse", "r2", "pearson_r", "n"}``; ``r2`` is ``1 - SS_res / SS_tot``
        (``nan`` when the true ages are constant), ``pearson_r`` is ``nan`` when either
        side is constant.

    Raises:
        ValueError: empty inputs, different lengths or non-finite values.
    """
    t = _as_1d(age_true, "age_true")
    p = _as_1d(age_pred, "age_pred")
    _same_length(t, p, "age_true and age_pred")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError("age_true and age_pred must be finite (found NaN or inf)")
    err = p - t
    ss_tot = float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    tc, pc = t - t.mean(), p - p.mean()
    norm = math.sqrt(float((tc**2).sum() * (pc**2).sum()))
    pearson = float((tc * pc).sum()) / norm if norm > 0 else math.nan
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(math.sqrt(float((err**2).mean()))),
        "r2": float(r2),
        "pearson_r": float(pearson),
        "n": int(t.size),
    }


def fit_bias_correction(age_true: ArrayLike, age_pred: ArrayLike) -> tuple[float, float]:
    """Fit the age-bias model ``pred = alpha * age + beta`` by least squares.

    Fit it on the validation split, never on the test split.

    Args:
        age_true: chronological ages in years, shape (N,), N >= 2, not all equal.
        age_pred: predicted ages in years, shape (N,).

    Returns:
        ``(alpha, beta)``: slope (unitless) and intercept (years).

    Raises:
        ValueError: fewer than 2 subjects, constant true ages, or a slope so close to 0
            (|alpha| < 1e-3: the predictions do not follow age) that correcting would
            divide by almost nothing.
    """
    t = _as_1d(age_true, "age_true")
    p = _as_1d(age_pred, "age_pred")
    _same_length(t, p, "age_true and age_pred")
    if t.size < 2 or float(np.ptp(t)) == 0.0:
        raise ValueError("bias correction needs at least 2 subjects with different ages")
    tc = t - t.mean()
    alpha = float((tc * (p - p.mean())).sum() / (tc**2).sum())
    beta = float(p.mean() - alpha * t.mean())
    if abs(alpha) < 1e-3:
        raise ValueError(f"bias correction slope alpha={alpha:.2g} is ~0: the predictions do not follow age")
    return alpha, beta


def apply_bias_correction(pred: ArrayLike, alpha: float, beta: float) -> np.ndarray:
    """Corrected ages ``(pred - beta) / alpha`` (years), shape (N,).

    Raises:
        ValueError: ``alpha`` is 0 or not finite.
    """
    if not math.isfinite(alpha) or alpha == 0.0:
        raise ValueError(f"alpha must be finite and non-zero, got {alpha}")
    return (np.asarray(pred, dtype=float) - beta) / alpha


def baseline_metrics(y_train: ArrayLike, y_test: ArrayLike, n_classes: int | None = None) -> dict[str, Any]:
    """Metrics of the trivial model a real one must beat, on the test targets.

    Classification (``n_classes`` given): always predict the most frequent training
    class (ties: the smallest index). Regression (``n_classes=None``): always predict
    the mean training age.

    Args:
        y_train: training targets (class indices or ages in years), shape (N_train,).
        y_test: test targets, shape (N_test,).
        n_classes: number of classes, or ``None`` for regression.

    Returns:
        :func:`classification_metrics` or :func:`regression_metrics` of the constant
        prediction, plus ``"strategy"`` (``"majority_class"`` or ``"train_mean"``) and
        ``"constant"`` (the predicted class or age).
    """
    test = _as_1d(y_test, "y_test")
    if n_classes is None:
        mean = float(_as_1d(y_train, "y_train").mean())
        out = regression_metrics(test, np.full(test.size, mean))
        out.update(strategy="train_mean", constant=mean)
        return out
    train = _as_1d(y_train, "y_train", dtype=np.int64)
    counts = np.bincount(train, minlength=n_classes)
    majority = int(np.argmax(counts))
    out = classification_metrics(test.astype(np.int64), np.full(test.size, majority), n_classes)
    out.update(strategy="majority_class", constant=majority)
    return out


def json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with NaN/inf floats replaced by ``None`` and NumPy scalars/arrays made plain.

    ``json.dumps`` writes NaN as the non-standard token ``NaN``; strict parsers reject it.
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
