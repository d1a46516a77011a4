"""Calibration on synthetic numbers: conformal coverage, bias coefficients recovered, OOD threshold, faults."""

from __future__ import annotations

import numpy as np
import pytest

from brainage_hpc.evaluation.calibration import (
    apply_calibration,
    check_calibration,
    conformal_interval,
    fit_bias,
    fit_calibration,
    fit_conformal,
    fit_ood,
    ood_scores,
)
from brainage_hpc.evaluation.trust import bootstrap_ci, trust_metrics


def _regression(n: int, rng: np.random.Generator, hetero: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    age = rng.uniform(20, 80, n)
    sd = rng.uniform(1, 6, n) if hetero else np.full(n, 4.0)
    pred = 0.7 * age + 15 + rng.normal(0, 1, n) * sd
    return age, pred, sd


def test_conformal_coverage_on_2000_draws_is_within_3_points_of_90_percent():
    rng = np.random.default_rng(0)
    age, pred, _ = _regression(200, rng)
    conf = fit_conformal(age, pred)
    assert conf["rank"] == 181 and conf["n"] == 200  # ceil(201 * 0.9)
    t_age, t_pred, _ = _regression(2000, rng)
    lo, hi = conformal_interval(t_pred, conf)
    cover = float(((t_age >= lo) & (t_age <= hi)).mean())
    assert abs(cover - 0.90) <= 0.03, cover


def test_normalised_conformal_covers_heteroscedastic_data_and_needs_the_spread():
    rng = np.random.default_rng(1)
    age, pred, sd = _regression(300, rng, hetero=True)
    conf = fit_conformal(age, pred, sd)
    assert conf["normalised"]
    t_age, t_pred, t_sd = _regression(2000, rng, hetero=True)
    lo, hi = conformal_interval(t_pred, conf, t_sd)
    assert abs(float(((t_age >= lo) & (t_age <= hi)).mean()) - 0.90) <= 0.03
    assert np.ptp(hi - lo) > 1.0  # widths follow the spread
    with pytest.raises(ValueError, match="spread"):
        conformal_interval(t_pred, conf)


def test_conformal_with_too_few_validation_subjects_says_so():
    out = fit_conformal(np.arange(8.0), np.arange(8.0) + 1)
    assert out["skipped"].startswith("too few validation subjects") and "at least 9" in out["skipped"]
    assert "q" in fit_conformal(np.arange(9.0), np.arange(9.0) + 1)


def test_bias_coefficients_are_recovered_and_the_correction_removes_the_gap_age_correlation():
    rng = np.random.default_rng(2)
    age = rng.uniform(20, 80, 500)
    pred = 0.6 * age + 18 + rng.normal(0, 2, age.size)  # known bias: alpha 0.6, beta 18
    bias = fit_bias(age, pred)
    assert bias["alpha"] == pytest.approx(0.6, abs=0.02) and bias["beta"] == pytest.approx(18, abs=1.0)
    assert "Beheshti" in bias["reference"] and "de Lange" in bias["reference"]
    cal = {"bias": bias, "conformal": {"skipped": "x"}, "ood": {"skipped": "x"}}
    cols = apply_calibration(cal, pred, age=age, bias_correct=True)
    gap, gap_c = pred - age, cols["brain_age_corrected"] - age
    assert np.corrcoef(age, gap)[0, 1] < -0.8 and abs(np.corrcoef(age, gap_c)[0, 1]) < 0.1
    assert np.allclose(cols["brain_age_gap_corrected"], gap_c)
    no_age = apply_calibration(cal, pred[:3], age=np.array([np.nan, 30.0, np.nan]), bias_correct=True)
    assert np.isnan(no_age["brain_age_corrected"][[0, 2]]).all() and np.isfinite(no_age["brain_age_corrected"][1])


def test_ood_threshold_is_the_conformal_rank_of_validation_scores_and_flags_far_points():
    rng = np.random.default_rng(3)
    train, val, test = rng.normal(size=(300, 6)), rng.normal(size=(100, 6)), rng.normal(size=(1000, 6))
    ood = fit_ood(train, val, "head_act")
    assert ood["rank"] == 99 and ood["threshold"] == pytest.approx(np.sort(ood_scores(val, ood))[98])
    assert (ood_scores(test, ood) > ood["threshold"]).mean() <= 0.05
    assert (ood_scores(test * 4 + 3, ood) > ood["threshold"]).mean() > 0.95
    small = fit_ood(train, val[:10])
    assert small["rank"] == "max" and small["threshold"] == pytest.approx(ood_scores(val[:10], small).max())
    assert "skipped" in fit_ood(np.zeros((5, 0)), np.zeros((2, 0)))


def test_check_calibration_refuses_another_model_and_damaged_files():
    rng = np.random.default_rng(4)
    age, pred, _ = _regression(50, rng)
    cal = fit_calibration(age, pred, rng.normal(size=(40, 3)), rng.normal(size=(50, 3)), model={"digest": "a" * 64, "step": 5})
    assert check_calibration(cal, "c.json", "a" * 64) is cal
    with pytest.raises(ValueError, match=r"^c.json: calibration was fitted for other weights .*step 5"):
        check_calibration(cal, "c.json", "b" * 64)
    with pytest.raises(ValueError, match="not a brainage calibration"):
        check_calibration({"bias": {}}, "c.json")
    with pytest.raises(ValueError, match="no 'ood' section"):
        check_calibration({**cal, "ood": None}, "c.json")


def test_nan_predictions_get_nan_bounds_and_are_left_out_of_the_fit():
    rng = np.random.default_rng(5)
    age, pred, _ = _regression(50, rng)
    pred[3] = np.nan
    cal = fit_calibration(age, pred, None, None)
    assert cal["conformal"]["n"] == 49 and "skipped" in cal["ood"]
    cols = apply_calibration(cal, pred)
    assert np.isnan(cols["age_lower"][3]) and np.isfinite(cols["age_lower"][[0, 1]]).all()


def test_trust_metrics_side_by_side_with_baseline_and_bootstrap_cis():
    import pandas as pd

    rng = np.random.default_rng(6)
    age, pred, _ = _regression(60, rng)
    df = pd.DataFrame({"age": age, "pred_age": pred, "age_bin": (age > 50).astype(int),
                       "pred_age_corrected": (pred - 15) / 0.7, "age_lower": pred - 6, "age_upper": pred + 6,
                       "ood_flag": np.zeros(60, bool), "member_0_age": pred + 1, "member_1_age": pred - 1})
    t = trust_metrics(df, None, 50.0, ("young", "old"))
    assert t["uncorrected"]["mae_ci95"][0] <= t["uncorrected"]["mae"] <= t["uncorrected"]["mae_ci95"][1]
    assert t["baseline"]["mae"] == pytest.approx(np.abs(age - 50).mean())
    assert t["gap_age_r"]["uncorrected"] < -0.5 and abs(t["gap_age_r"]["corrected"]) < 0.3
    assert [b["bin"] for b in t["per_bin"]] == ["young", "old"] and t["ood"]["flag_rate"] == 0.0
    assert t["intervals"]["median_width"] == pytest.approx(12.0)
    assert set(t["ensemble"]["members"]) == {"0", "1"}
    assert bootstrap_ci(age, pred) == bootstrap_ci(age, pred)  # seeded


@pytest.mark.parametrize("name,params,dim", [
    ("cnn3d", {"depth": 2, "width": 4}, None),
    ("sfcn", {"channels": [4, 8, 16, 16]}, 16),
    ("cvae", {"latent_dim": 8, "channels": [4, 8, 8, 16], "padding": "same", "feature_dim": 32}, 8),
])
def test_penultimate_features_leave_the_outputs_unchanged(name, params, dim):
    import torch

    from brainage_hpc.models.features import forward_with_features, penultimate_module
    from brainage_hpc.models.registry import get_model_class

    torch.manual_seed(0)
    model = get_model_class(name)(in_shape=(32, 32, 32), task="regress", **params).eval()
    batch = {"image": torch.randn(2, 1, 32, 32, 32), "sex": torch.tensor([0.0, 1.0])}
    with torch.no_grad():
        plain = model(batch)["pred_age"]
        out, feats = forward_with_features(model, batch)
    assert torch.equal(out["pred_age"], plain) and feats.shape[0] == 2 and feats.ndim == 2
    assert dim is None or feats.shape[1] == dim
    assert not penultimate_module(model)._forward_hooks  # the hook is removed again
