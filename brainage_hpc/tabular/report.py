"""``report.md`` of a tabular run, and where its headline numbers sit in ``metrics.json``.

``metrics.json`` uses the layout of ``brainage evaluate`` for the test split
(``classification.4class`` / ``classification.2class``, ``regression``,
``regression_bias_corrected``, ``bias_correction``, ``baselines``), so deep and
tabular runs are read by the same code; :func:`headline` picks the block of the
run's own task.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["headline", "render_report"]

# task -> (section, key) of its metrics in metrics.json, also the key in "baselines"
_TASK_BLOCK: dict[str, tuple[str, str]] = {
    "regress": ("regression", "regression"),
    "classify4": ("classification", "4class"),
    "classify2": ("classification", "2class"),
}


def headline(metrics: dict[str, Any], part: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of the run's task and of its baseline: ``(model, baseline)``.

    Args:
        metrics: the dict of ``metrics.json``.
        part: a split block of it (``metrics["val"]``); default: the test split (top level).

    Example:
        ``headline(m)[0]["mae"]`` for a regression run, ``headline(m)[0]["f1_micro"]`` for classify4.
    """
    section, key = _TASK_BLOCK[metrics["task"]]
    block = metrics if part is None else part
    model = block[section] if section == "regression" else block[section][key]
    return model, metrics["baselines"][key]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if v == v else "n/a"  # NaN: undefined (e.g. Pearson r of a constant)
    return str(v)


def _metric_table(metrics: dict[str, Any], keys: list[str]) -> list[str]:
    test, base = headline(metrics)
    cols = [("test", test), ("baseline", base)]
    if metrics.get("val"):
        cols.insert(0, ("val", headline(metrics, metrics["val"])[0]))
    if metrics.get("regression_bias_corrected"):
        cols.insert(-1, ("test, bias-corrected", metrics["regression_bias_corrected"]))
    out = ["| metric | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    out += [f"| {k} | " + " | ".join(_fmt(d.get(k)) for _, d in cols) + " |" for k in keys]
    return out


def render_report(metrics: dict[str, Any], importance: pd.DataFrame, notes: list[str], top: int = 10) -> str:
    """Markdown summary: data, split, model, metrics against the baseline, top features, notes.

    Args:
        metrics: the dict written to ``metrics.json``.
        importance: table from :func:`brainage_hpc.tabular.importance.importance_table`.
        notes: data-handling notes (dropped columns/subjects, imputation).
        top: number of features listed.
    """
    regression = metrics["task"] == "regress"
    keys = ["mae", "rmse", "r2", "pearson_r"] if regression else ["f1_micro", "f1_macro", "balanced_accuracy"]
    n = metrics["n_split"]
    search = metrics["search"]
    base = headline(metrics)[1]
    lines = [
        f"# Tabular {metrics['task']} with `{metrics['model']}`",
        "",
        f"- table: `{metrics['table']}` ({metrics['n_features']} features)",
        f"- subjects: train {n['train']}, val {n['val']}, test {n['test']}; split: {metrics['split_source']}",
        f"- seed {metrics['seed']}; "
        + (
            f"search: defaults + {len(search['trials']) - 1} sampled settings, "
            f"best validation {search['score_name']} = {_fmt(search['val_score'])}"
            if n["val"]
            else "no validation split: hyper-parameters at their defaults"
        ),
        f"- chosen hyper-parameters: `{metrics['params'] or 'defaults'}`",
        "- missing values: median of the training split (SimpleImputer in the pipeline)",
        "",
        "## Metrics",
        "",
        *_metric_table(metrics, keys),
        "",
        f"Baseline: {base['strategy'].replace('_', ' ')} ({_fmt(base['constant'])}), fitted on train.",
    ]
    bc = metrics.get("bias_correction", {})
    if regression and "alpha" in bc:
        lines.append(
            f"Bias correction fitted on validation: pred = {bc['alpha']:.3f} · age + {bc['beta']:.2f}; "
            "corrected = (pred − β) / α."
        )
    if regression:
        c4 = metrics["classification"]["4class"]
        lines.append(
            f"Predicted ages as 4 age bins: test f1_micro {_fmt(c4['f1_micro'])}, "
            f"balanced accuracy {_fmt(c4['balanced_accuracy'])}."
        )
    else:
        cm = headline(metrics)[0]["confusion_matrix"]
        lines += ["", "Test confusion matrix (rows true, columns predicted):", "", "```"]
        lines += [" ".join(f"{v:4d}" for v in row) for row in cm] + ["```"]
    score = "test MAE increase, years" if regression else "test balanced-accuracy drop"
    lines += ["", f"## Top {top} features (permutation importance: {score}, 95% CI)", ""]
    lines += ["| rank | feature | importance | 95% CI |", "|---|---|---|---|"]
    for row in importance.head(top).itertuples(index=False):
        lines.append(
            f"| {row.rank} | {row.feature} | {row.importance_mean:.4f} | [{row.ci95_low:.4f}, {row.ci95_high:.4f}] |"
        )
    lines += ["", "Full table: `importance.csv`; chart: `importance.png`; per-subject: `predictions.csv`."]
    if notes:
        lines += ["", "## Data notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
