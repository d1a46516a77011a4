"""The ``trust`` section of ``brainage evaluate``'s metrics.json and report.md.

For the evaluated split (pure functions of its predictions table):

* ``uncorrected`` / ``corrected`` / ``baseline``: MAE and Pearson r, each with a seeded
  percentile-bootstrap 95 % CI (2000 resamples of subjects); the baseline predicts the
  mean training age (r undefined). A corrected metric flatters a weak model (the
  correction uses the true age), so the baseline always stands beside it;
* ``gap_age_r``: Pearson r of the brain-age gap (pred - age) with age, before and after
  the correction (the correction should bring it to ~0);
* ``per_bin``: mean gap per true age bin, before and after;
* ``intervals``: empirical coverage of the conformal intervals and their median width;
* ``ood``: the fraction of scans flagged and the threshold;
* ``ensemble``: each member's MAE next to the ensemble's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["bootstrap_ci", "trust_lines", "trust_metrics"]

N_BOOT = 2000
SEED = 0


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def bootstrap_ci(age: np.ndarray, pred: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED) -> dict[str, Any]:
    """MAE and Pearson r with percentile-bootstrap 95 % CIs (resampling subjects, seeded)."""
    age, pred = np.asarray(age, float), np.asarray(pred, float)
    n = age.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    err = np.abs(pred - age)
    maes = err[idx].mean(1)
    a, p = age[idx], pred[idx]
    ac, pc = a - a.mean(1, keepdims=True), p - p.mean(1, keepdims=True)
    den = np.sqrt((ac**2).sum(1) * (pc**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rs = np.where(den > 0, (ac * pc).sum(1) / den, np.nan)
    rs = rs[np.isfinite(rs)]
    r_ci = [float(np.percentile(rs, 2.5)), float(np.percentile(rs, 97.5))] if rs.size else [None, None]
    return {"mae": float(err.mean()), "mae_ci95": [float(np.percentile(maes, 2.5)), float(np.percentile(maes, 97.5))],
            "pearson_r": _pearson(age, pred), "pearson_r_ci95": r_ci, "n": int(n), "n_boot": n_boot, "seed": seed}


def trust_metrics(pred: pd.DataFrame, cal: dict[str, Any] | None, train_mean_age: float | None,
                  bin_labels: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``trust`` dict (see the module docstring) of a predictions table.

    Args:
        pred: columns ``age``, ``age_bin``, ``pred_age`` and, when available, ``pred_age_corrected``,
            ``age_lower``/``age_upper``, ``ood_flag``, ``member_<i>_age``.
        cal: the calibration used (for methods and thresholds), or None.
        train_mean_age: mean training age for the baseline, or None.
        bin_labels: names of the age bins (index = ``age_bin``).
    """
    out: dict[str, Any] = {"calibration": None}
    if cal is not None:
        out["calibration"] = {k: {kk: v for kk, v in cal.get(k, {}).items() if kk not in ("mean", "precision")}
                              for k in ("bias", "conformal", "ood")}
        out["calibration"]["model"] = cal.get("model")
    age = pred["age"].to_numpy(float)
    p = pred["pred_age"].to_numpy(float)
    known = np.isfinite(age) & np.isfinite(p)
    out["n_nonfinite_predictions"] = int((~np.isfinite(p)).sum())
    if "ood_flag" in pred:
        flags = pred["ood_flag"].to_numpy(bool)
        out["ood"] = {"flag_rate": float(flags.mean()) if flags.size else None, "n_flagged": int(flags.sum()),
                      "n": int(flags.size), "threshold": (cal or {}).get("ood", {}).get("threshold")}
    if not known.sum():
        out["skipped"] = "no subject with an exact age and a finite prediction"
        return out
    a, pk = age[known], p[known]
    out["uncorrected"] = bootstrap_ci(a, pk)
    gap = pk - a
    out["gap_age_r"] = {"uncorrected": _pearson(a, gap)}
    corr = pred["pred_age_corrected"].to_numpy(float)[known] if "pred_age_corrected" in pred else None
    if corr is not None and np.isfinite(corr).all():
        out["corrected"] = bootstrap_ci(a, corr)
        out["gap_age_r"]["corrected"] = _pearson(a, corr - a)
    if train_mean_age is not None:
        base = bootstrap_ci(a, np.full(a.size, float(train_mean_age)))
        base.update(pearson_r=None, pearson_r_ci95=[None, None], strategy="train_mean", constant=float(train_mean_age))
        out["baseline"] = base
    bins = pred["age_bin"].to_numpy(int)[known]
    per_bin = []
    for b in sorted(set(bins.tolist())):
        m = bins == b
        row: dict[str, Any] = {"bin": bin_labels[b] if b < len(bin_labels) else str(b), "n": int(m.sum()),
                               "mean_gap": float(gap[m].mean())}
        if corr is not None and np.isfinite(corr).all():
            row["mean_gap_corrected"] = float((corr - a)[m].mean())
        per_bin.append(row)
    out["per_bin"] = per_bin
    if "age_lower" in pred and "age_upper" in pred:
        lo, hi = pred["age_lower"].to_numpy(float)[known], pred["age_upper"].to_numpy(float)[known]
        inside = (a >= lo) & (a <= hi)
        out["intervals"] = {"coverage": float(inside.mean()), "median_width": float(np.median(hi - lo)),
                            "nominal": (cal or {}).get("conformal", {}).get("nominal"), "n": int(a.size)}
    members = sorted(c for c in pred.columns if c.startswith("member_") and c.endswith("_age"))
    if members:
        out["ensemble"] = {"mae": float(np.abs(gap).mean()),
                           "members": {c[len("member_"):-len("_age")]: float(np.abs(pred[c].to_numpy(float)[known] - a).mean())
                                       for c in members}}
    return out


def _ci(d: dict[str, Any] | None, key: str) -> str:
    if not d or d.get(key) is None:
        return "–"
    lo, hi = d.get(f"{key}_ci95") or [None, None]
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{d[key]:.2f}{ci}"


def trust_lines(trust: dict[str, Any]) -> list[str]:
    """Markdown of the ``trust`` dict for report.md."""
    lines = ["## Trust: bias correction, intervals, out-of-distribution", ""]
    cal = trust.get("calibration") or {}
    bias = cal.get("bias") or {}
    if "alpha" in bias:
        lines += [f"Bias correction: {bias.get('method')} ({bias.get('reference')}); "
                  f"pred = {bias['alpha']:.3f} · age + {bias['beta']:.2f}, fitted on {bias.get('n')} validation subjects.", ""]
    elif bias:
        lines += [f"Bias correction: {bias.get('skipped')}", ""]
    if "uncorrected" in trust:
        lines += ["| metric (95 % bootstrap CI) | uncorrected | bias-corrected | predict train mean |", "|---|---|---|---|"]
        u, c, b = trust.get("uncorrected"), trust.get("corrected"), trust.get("baseline")
        lines.append(f"| MAE (years) | {_ci(u, 'mae')} | {_ci(c, 'mae')} | {_ci(b, 'mae')} |")
        lines.append(f"| Pearson r | {_ci(u, 'pearson_r')} | {_ci(c, 'pearson_r')} | – |")
        g = trust.get("gap_age_r", {})
        fmt = (lambda v: "–" if v is None or not np.isfinite(v) else f"{v:.2f}")
        lines.append(f"| r(brain-age gap, age) | {fmt(g.get('uncorrected'))} | {fmt(g.get('corrected'))} | – |")
        lines += ["", "A corrected metric uses the true age, so it flatters a weak model: compare it with the baseline.", ""]
        lines += ["| age bin | n | mean gap (years) | mean gap corrected |", "|---|---|---|---|"]
        for row in trust.get("per_bin", []):
            lines.append(f"| {row['bin']} | {row['n']} | {row['mean_gap']:.2f} | {fmt(row.get('mean_gap_corrected'))} |")
        lines.append("")
    iv = trust.get("intervals")
    if iv:
        lines.append(f"Conformal intervals (nominal {iv['nominal']}): empirical coverage {iv['coverage']:.3f} "
                     f"on {iv['n']} subjects, median width {iv['median_width']:.2f} years.")
    elif (cal.get("conformal") or {}).get("skipped"):
        lines.append(f"Conformal intervals: {cal['conformal']['skipped']}.")
    ood = trust.get("ood")
    if ood:
        lines.append(f"Out-of-distribution: {ood['n_flagged']} of {ood['n']} scans flagged "
                     f"(rate {ood['flag_rate']:.3f}, Mahalanobis threshold {ood['threshold']:.2f}).")
    elif (cal.get("ood") or {}).get("skipped"):
        lines.append(f"Out-of-distribution: {cal['ood']['skipped']}.")
    ens = trust.get("ensemble")
    if ens:
        parts = ", ".join(f"member {k}: {v:.2f}" for k, v in ens["members"].items())
        lines.append(f"Ensemble MAE {ens['mae']:.2f} years ({parts}).")
    return lines
