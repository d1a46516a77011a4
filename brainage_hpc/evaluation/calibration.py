"""Trust in a prediction: bias correction, conformal intervals and an out-of-distribution flag.

Everything here is fitted once per run by ``brainage calibrate`` (or on the fly by
``brainage evaluate`` when the run has none) and stored in ``<run>/calibration.json``
(contract 7), which ``brainage predict`` and exported models apply. The three parts:

* ``bias``: the age-bias correction used in the brain-age literature: a *linear
  regression of predicted on true age*, ``pred = alpha * age + beta``, fitted on the
  **validation** split only, and ``corrected = (pred - beta) / alpha`` (Beheshti et al.
  2019, NeuroImage: Clinical 24:102063; de Lange & Cole 2020, NeuroImage: Clinical
  26:102229). It needs the true age, so ``predict --bias-correct`` applies it only to
  scans whose age is given (CSV/BIDS tables).
* ``conformal``: split-conformal prediction intervals (Vovk et al. 2005; Lei et al.
  2018) around the *uncorrected* point prediction. Scores are the absolute validation
  residuals ``|age - pred|`` (or ``|age - pred| / max(sd, sd_floor)`` for an ensemble,
  ``sd`` = the members' spread: *normalised* intervals), and ``q`` is the
  ``ceil((n + 1) * nominal)``-th smallest score (the finite-sample correction), so an
  exchangeable new scan falls in ``pred +- q`` (``+- q * sd``) with probability
  >= ``nominal`` (0.90). With fewer than ``ceil(nominal / (1 - nominal)) = 9``
  validation subjects no finite ``q`` exists: conformal is skipped and says so.
* ``ood``: a Mahalanobis distance of the penultimate-layer features
  (:mod:`brainage_hpc.models.features`) to the training scans, with a Ledoit-Wolf
  shrinkage covariance (scikit-learn) fitted on the **train** split; the flag
  threshold is the ``ceil((n + 1) * 0.975)``-th smallest **validation** score
  (conformal again, so an in-distribution scan is flagged with probability <= 2.5 %,
  under the 5 % the issue allows); with fewer than 39 validation scans it is the
  largest validation score (``rank: "max"``, probability <= 1 / (n + 1)).

``calibration.json`` (``version`` 1)::

    {"format": "brainage-calibration", "version": 1, "created": ISO time,
     "model": {"digest": sha256 of the weights (exported.model_digest), "step": int, "name": str,
               "members": [run, ...]},                          # members: ensembles only
     "fitted_on": {"shards": path, "train_split": "train", "val_split": "val"},
     "bias": {"method": ..., "reference": ..., "alpha": a, "beta": b, "n": n_val}
             | {"skipped": reason},
     "conformal": {"method": ..., "nominal": 0.9, "q": years (or sd units), "n": n_val, "rank": k,
                   "normalised": bool, "sd_floor": years} | {"skipped": reason},
     "ood": {"method": ..., "layer": module name, "mean": [F], "precision": [[F x F]], "n_train": n,
             "n_val": n, "level": 0.975, "rank": k | "max", "threshold": distance} | {"skipped": reason}}

``load_model`` refuses a ``calibration.json`` whose digest is not the loaded weights'
(one line: calibrate again), so intervals of one model are never applied to another.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BIAS_METHOD",
    "CALIBRATION_FORMAT",
    "CONFORMAL_NOMINAL",
    "OOD_LEVEL",
    "apply_calibration",
    "check_calibration",
    "conformal_interval",
    "fit_bias",
    "fit_calibration",
    "fit_conformal",
    "fit_ood",
    "ood_scores",
    "write_calibration",
]

CALIBRATION_FORMAT = "brainage-calibration"
CALIBRATION_VERSION = 1
CONFORMAL_NOMINAL = 0.90
OOD_LEVEL = 0.975
SD_FLOOR = 0.25  # years: an ensemble spread below this is taken as this (no zero-width interval)
BIAS_METHOD = "linear regression of predicted on true age on the validation split; corrected = (pred - beta) / alpha"
BIAS_REFERENCE = "Beheshti et al. 2019 (NeuroImage: Clinical 24:102063); de Lange & Cole 2020 (NeuroImage: Clinical 26:102229)"
CONFORMAL_METHOD = "split-conformal, absolute residual score, finite-sample rank ceil((n+1)*nominal)"
OOD_METHOD = "Mahalanobis distance of penultimate features, Ledoit-Wolf covariance fitted on train, threshold from validation"


def _conformal_rank(n: int, level: float) -> int:
    """1-based rank of the finite-sample conformal quantile of ``n`` scores (> n when impossible)."""
    return int(math.ceil((n + 1) * level - 1e-9))


def fit_bias(age: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Bias coefficients of ``pred = alpha * age + beta`` (validation split), or ``{"skipped": why}``."""
    from brainage_hpc.evaluation.metrics import fit_bias_correction

    try:
        alpha, beta = fit_bias_correction(age, pred)
    except ValueError as exc:
        return {"skipped": f"cannot fit the bias correction on the validation split: {exc}"}
    out: dict[str, Any] = {"method": BIAS_METHOD, "reference": BIAS_REFERENCE, "alpha": alpha, "beta": beta,
                           "n": int(np.size(age))}
    if alpha < 0.1:
        out["warning"] = f"slope alpha={alpha:.3g} < 0.1: the predictions barely follow age, so corrected ages are unstable"
    return out


def fit_conformal(age: np.ndarray, pred: np.ndarray, sd: np.ndarray | None = None,
                  nominal: float = CONFORMAL_NOMINAL) -> dict[str, Any]:
    """Split-conformal quantile of the validation residuals, or ``{"skipped": why}`` (see the module docstring).

    Args:
        age, pred: validation ages and predictions (years), shape (N,).
        sd: ensemble spread (years) per subject for normalised scores, or None.
        nominal: target coverage in (0, 1).
    """
    age, pred = np.asarray(age, float), np.asarray(pred, float)
    n = int(age.size)
    k = _conformal_rank(n, nominal)
    if k > n:
        need = _conformal_rank(0, nominal)
        need = next(m for m in range(need, 10 * need + 10) if _conformal_rank(m, nominal) <= m)
        return {"skipped": f"too few validation subjects for {nominal:.0%} conformal intervals: {n} (needs at least {need})"}
    scores = np.abs(age - pred)
    normalised = sd is not None
    if normalised:
        scores = scores / np.maximum(np.asarray(sd, float), SD_FLOOR)
    q = float(np.sort(scores)[k - 1])
    return {"method": CONFORMAL_METHOD, "nominal": nominal, "q": q, "n": n, "rank": k, "normalised": normalised,
            "sd_floor": SD_FLOOR}


def conformal_interval(pred: np.ndarray, conformal: dict[str, Any], sd: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) years of the conformal interval around ``pred``.

    Raises:
        ValueError: a normalised calibration but no ensemble spread.
    """
    pred = np.asarray(pred, float)
    half = np.full(pred.shape, float(conformal["q"]))
    if conformal.get("normalised"):
        if sd is None:
            raise ValueError("the conformal calibration is normalised by the ensemble spread, but no spread was given")
        half = half * np.maximum(np.asarray(sd, float), float(conformal.get("sd_floor", SD_FLOOR)))
    return pred - half, pred + half


def fit_ood(train_features: np.ndarray, val_features: np.ndarray, layer: str = "",
            level: float = OOD_LEVEL) -> dict[str, Any]:
    """Mahalanobis OOD parameters (train) and flag threshold (validation), or ``{"skipped": why}``."""
    from sklearn.covariance import LedoitWolf

    tr, va = np.asarray(train_features, np.float64), np.asarray(val_features, np.float64)
    if tr.ndim != 2 or tr.shape[1] == 0:
        return {"skipped": "the model gives no penultimate features"}
    if tr.shape[0] < 3 or va.shape[0] < 1:
        return {"skipped": f"too few scans to fit the OOD score ({tr.shape[0]} train, {va.shape[0]} validation)"}
    if not (np.isfinite(tr).all() and np.isfinite(va).all()):
        return {"skipped": "non-finite penultimate features on train or validation"}
    lw = LedoitWolf().fit(tr)
    params: dict[str, Any] = {"method": OOD_METHOD, "layer": layer, "mean": lw.location_.tolist(),
                              "precision": lw.precision_.tolist(), "shrinkage": float(lw.shrinkage_),
                              "n_train": int(tr.shape[0]), "n_val": int(va.shape[0]), "level": level}
    scores = np.sort(ood_scores(va, params))
    k = _conformal_rank(len(scores), level)
    params["rank"] = k if k <= len(scores) else "max"
    params["threshold"] = float(scores[min(k, len(scores)) - 1])
    return params


def ood_scores(features: np.ndarray, ood: dict[str, Any]) -> np.ndarray:
    """Mahalanobis distance (N,) of features (N, F) to the training distribution."""
    x = np.asarray(features, np.float64)
    prec = np.asarray(ood["precision"], np.float64)
    if x.ndim != 2 or x.shape[1] != prec.shape[0]:
        raise ValueError(f"features have {x.shape[-1]} dimensions, the OOD calibration {prec.shape[0]}")
    x = x - np.asarray(ood["mean"], np.float64)
    return np.sqrt(np.maximum(np.einsum("nf,fg,ng->n", x, prec, x), 0.0))


def fit_calibration(val_age: np.ndarray, val_pred: np.ndarray, train_features: np.ndarray | None,
                    val_features: np.ndarray | None, val_sd: np.ndarray | None = None, layer: str = "",
                    model: dict[str, Any] | None = None, fitted_on: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole ``calibration.json`` dict from validation predictions and train/validation features.

    Subjects without a finite age or prediction are left out of the bias and conformal fits.
    """
    age, pred = np.asarray(val_age, float), np.asarray(val_pred, float)
    ok = np.isfinite(age) & np.isfinite(pred)
    sd = None if val_sd is None else np.asarray(val_sd, float)[ok]
    if not ok.any():
        bias: dict[str, Any] = {"skipped": "no validation subject with an exact age and a finite prediction"}
        conformal: dict[str, Any] = dict(bias)
    else:
        bias = fit_bias(age[ok], pred[ok])
        conformal = fit_conformal(age[ok], pred[ok], sd)
    if train_features is None or val_features is None:
        ood: dict[str, Any] = {"skipped": "the model gives no penultimate features"}
    else:
        ood = fit_ood(train_features, val_features, layer)
    return {
        "format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": dict(model or {}), "fitted_on": dict(fitted_on or {}),
        "bias": bias, "conformal": conformal, "ood": ood,
    }


def check_calibration(cal: Any, source: str | Path, digest: str | None = None) -> dict[str, Any]:
    """``cal`` if it is a version-1 calibration for the weights with ``digest`` (None: not checked).

    Raises:
        ValueError: one line naming ``source``: not a calibration, another version, or another model's.
    """
    if not isinstance(cal, dict) or cal.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{source}: not a brainage calibration (run `brainage calibrate` again)")
    if cal.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"{source}: calibration version {cal.get('version')!r}, this brainage reads {CALIBRATION_VERSION}")
    for key in ("bias", "conformal", "ood", "model"):
        if not isinstance(cal.get(key), dict):
            raise ValueError(f"{source}: damaged calibration (no '{key}' section); run `brainage calibrate` again")
    recorded = cal["model"].get("digest")
    if digest is not None and recorded != digest:
        raise ValueError(f"{source}: calibration was fitted for other weights (digest {str(recorded)[:12]}, "
                         f"model {digest[:12]}, step {cal['model'].get('step')}); run `brainage calibrate` again")
    return cal


def _usable(section: dict[str, Any] | None) -> bool:
    return bool(section) and "skipped" not in section  # type: ignore[operator]


def apply_calibration(cal: dict[str, Any] | None, pred: np.ndarray, features: np.ndarray | None = None,
                      sd: np.ndarray | None = None, age: np.ndarray | None = None,
                      bias_correct: bool = False) -> dict[str, np.ndarray]:
    """Per-scan calibrated columns for predictions ``pred`` (N,).

    Returns:
        ``age_lower``/``age_upper`` (years) when conformal is fitted; ``ood_score``/``ood_flag``
        when the OOD part is fitted and ``features`` are given; with ``bias_correct`` and ``age``,
        ``brain_age_corrected`` and ``brain_age_gap_corrected`` (NaN where the age is unknown).
        Non-finite predictions give NaN bounds.
    """
    pred = np.asarray(pred, float)
    out: dict[str, np.ndarray] = {}
    if cal is None:
        return out
    if _usable(cal.get("conformal")) and (sd is not None or not cal["conformal"].get("normalised")):
        out["age_lower"], out["age_upper"] = conformal_interval(pred, cal["conformal"], sd)
    if _usable(cal.get("ood")) and features is not None and np.asarray(features).shape[-1] > 0:
        score = ood_scores(features, cal["ood"])
        out["ood_score"] = score
        out["ood_flag"] = (~np.isfinite(score)) | (score > float(cal["ood"]["threshold"]))
    if bias_correct and age is not None and _usable(cal.get("bias")):
        from brainage_hpc.evaluation.metrics import apply_bias_correction

        a = np.asarray(age, float)
        corrected = apply_bias_correction(pred, cal["bias"]["alpha"], cal["bias"]["beta"])
        corrected = np.where(np.isfinite(a), corrected, np.nan)
        out["brain_age_corrected"] = corrected
        out["brain_age_gap_corrected"] = corrected - a
    return out


def write_calibration(path: str | Path, cal: dict[str, Any]) -> Path:
    """Write ``calibration.json`` atomically (NaN as null)."""
    from brainage_hpc.report import write_json

    return write_json(Path(path), cal)
