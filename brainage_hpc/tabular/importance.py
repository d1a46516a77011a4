"""Feature importance of a fitted table model: permutation (test split) and impurity.

Permutation importance shuffles one feature at a time on the *test* split and
measures how much the score drops (``n_repeats`` shuffles per feature). For
regression the score is the MAE, so the importance reads "the test MAE grows by
this many years without the feature"; for classification it is the drop in
balanced accuracy. The 95 % confidence interval is ``mean ± t(0.975, n-1) ·
std / sqrt(n)`` over the repeats: it covers the shuffling noise only, not the
sampling of subjects or the model fit. Correlated features share their
importance (shuffling one leaves its twins intact), so read the ranking by group.

Impurity (mean decrease in impurity) importance is added when the fitted model
has ``feature_importances_`` (random forest, XGBoost, LightGBM; not
HistGradientBoosting); it is computed on the training split and favours
high-cardinality features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats
from sklearn.inspection import permutation_importance

__all__ = ["IMPORTANCE_COLUMNS", "importance_figure", "importance_table"]

IMPORTANCE_COLUMNS: tuple[str, ...] = (
    "rank",
    "feature",
    "importance_mean",
    "importance_std",
    "ci95_low",
    "ci95_high",
    "impurity_importance",
)


def _impurity(model: Any, n_features: int) -> np.ndarray:
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    values = getattr(final, "feature_importances_", None)
    if values is None or len(values) != n_features:
        return np.full(n_features, np.nan)
    return np.asarray(values, dtype=float)


def importance_table(
    model: Any,
    X: np.ndarray,
    y: np.ndarray,
    feature_names: Sequence[str],
    regression: bool,
    n_repeats: int = 10,
    seed: int = 0,
    n_jobs: int = 1,
) -> pd.DataFrame:
    """Permutation importance with 95 % CIs, plus impurity importance when available.

    Args:
        model: fitted estimator/pipeline taking (N, F) features.
        X: test features, (N, F).
        y: test targets, (N,): ages in years or class indices.
        feature_names: F names, in column order.
        regression: score with MAE (years) instead of balanced accuracy.
        n_repeats: shuffles per feature (>= 2 for a confidence interval).
        seed: seed of the shuffles.
        n_jobs: parallel features.

    Returns:
        Frame with :data:`IMPORTANCE_COLUMNS`, sorted by ``importance_mean`` descending
        (ties by name), ``rank`` starting at 1.

    Raises:
        ValueError: ``n_repeats < 2``, or names that do not match the columns of X.
    """
    if n_repeats < 2:
        raise ValueError(f"n_repeats must be >= 2 for a confidence interval, got {n_repeats}")
    if len(feature_names) != X.shape[1]:
        raise ValueError(f"{len(feature_names)} feature names for {X.shape[1]} columns")
    scoring = "neg_mean_absolute_error" if regression else "balanced_accuracy"
    result = permutation_importance(model, X, y, scoring=scoring, n_repeats=n_repeats, random_state=seed, n_jobs=n_jobs)
    per_repeat = np.asarray(result.importances, dtype=float)  # (F, n_repeats)
    mean = per_repeat.mean(axis=1)
    std = per_repeat.std(axis=1, ddof=1)
    half = float(stats.t.ppf(0.975, n_repeats - 1)) * std / math.sqrt(n_repeats)
    df = pd.DataFrame(
        {
            "feature": list(feature_names),
            "importance_mean": mean,
            "importance_std": std,
            "ci95_low": mean - half,
            "ci95_high": mean + half,
            "impurity_importance": _impurity(model, X.shape[1]),
        }
    )
    df = df.sort_values(["importance_mean", "feature"], ascending=[False, True], kind="mergesort").reset_index(
        drop=True
    )
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df[list(IMPORTANCE_COLUMNS)]


def importance_figure(table: pd.DataFrame, top: int = 20, title: str = "", xlabel: str = "") -> Figure:
    """Horizontal bar chart of the ``top`` features with 95 % CI error bars.

    Uses :class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot), so it works
    headless and leaves the global matplotlib backend alone. Save with ``fig.savefig``.
    """
    head = table.head(top).iloc[::-1]  # largest at the top
    fig = Figure(figsize=(8, 0.32 * len(head) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    mean = head["importance_mean"].to_numpy()
    err = np.vstack([mean - head["ci95_low"].to_numpy(), head["ci95_high"].to_numpy() - mean])
    ax.barh(head["feature"], mean, xerr=err, color="#4C72B0", ecolor="black", capsize=2)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel or "permutation importance (score drop)")
    ax.set_title(title or f"top {len(head)} features, permutation importance (test split, 95% CI)")
    ax.tick_params(axis="y", labelsize=8)
    return fig
