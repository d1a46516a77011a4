"""brainage_hpc.evaluation.metrics against hand computations (and scikit-learn/scipy where they agree)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score

from brainage_hpc.evaluation.metrics import (
    apply_bias_correction,
    baseline_metrics,
    classification_metrics,
    fit_bias_correction,
    json_safe,
    regression_metrics,
)


def test_classification_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y_true, y_pred, n_classes=3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1_micro"] == pytest.approx(4 / 6)
    # per-class F1 = 2 tp / (true + predicted): 2/4, 4/5, 2/3
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # recalls 1/2, 2/2, 1/2
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["n"] == 6
    assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_classification_absent_classes():
    # class 3 (36+) absent from both sides: skipped in the macro average, still a row/column
    m = classification_metrics([0, 1, 2], [0, 1, 1], n_classes=4)
    assert len(m["confusion_matrix"]) == 4 and m["confusion_matrix"][3] == [0, 0, 0, 0]
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # class 1 only predicted: F1 0 in the macro mean, not in balanced accuracy (no true member)
    m = classification_metrics([0, 0], [0, 1], n_classes=2)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["balanced_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "y_true, y_pred, n, msg",
    [
        ([0, 1], [0], 2, "different lengths"),
        ([0, 4], [0, 1], 4, "outside"),
        ([], [], 2, "empty"),
        ([0], [0], 1, ">= 2"),
    ],
)
def test_classification_rejects_bad_input(y_true, y_pred, n, msg):
    with pytest.raises(ValueError, match=msg):
        classification_metrics(y_true, y_pred, n)


def test_regression_by_hand():
    t, p = [20.0, 25.0, 30.0], [22.0, 25.0, 27.0]
    m = regression_metrics(t, p)
    assert m["mae"] == pytest.approx(5 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(13 / 3))
    assert m["r2"] == pytest.approx(1 - 13 / 50)
    assert m["pearson_r"] == pytest.approx(25 / math.sqrt(50 * (64 / 9 + 1 / 9 + 49 / 9)))
    assert m["pearson_r"] == pytest.approx(stats.pearsonr(t, p).statistic)
    assert m["n"] == 3


def test_regression_undefined_values_are_nan_and_json_null():
    m = regression_metrics([20.0, 30.0], [25.0, 25.0])
    assert math.isnan(m["pearson_r"])
    assert m["mae"] == 5.0
    text = json.dumps(json_safe({"test": m, "arr": np.array([1.5, np.inf]), "k": np.int64(3)}))
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert back["test"]["pearson_r"] is None and back["arr"] == [1.5, None] and back["k"] == 3
    with pytest.raises(ValueError, match="finite"):
        regression_metrics([20.0, np.nan], [1.0, 2.0])


def test_bias_correction_recovers_alpha_beta():
    rng = np.random.default_rng(0)
    age = rng.uniform(22, 37, size=500)
    pred = 0.6 * age + 11.0  # regression to the mean: old predicted too young
    alpha, beta = fit_bias_correction(age, pred)
    assert alpha == pytest.approx(0.6, abs=1e-10) and beta == pytest.approx(11.0, abs=1e-8)
    np.testing.assert_allclose(apply_bias_correction(pred, alpha, beta), age, atol=1e-8)
    noisy = pred + rng.normal(0, 0.5, size=age.size)
    alpha, beta = fit_bias_correction(age, noisy)
    assert alpha == pytest.approx(0.6, abs=0.03) and beta == pytest.approx(11.0, abs=1.0)
    corrected = apply_bias_correction(noisy, alpha, beta)
    assert abs(np.polyfit(age, corrected, 1)[0] - 1.0) < 1e-8  # slope 1 after correction (on the fit data)


def test_bias_correction_rejects_degenerate_input():
    with pytest.raises(ValueError, match="different ages"):
        fit_bias_correction([30.0, 30.0], [29.0, 31.0])
    with pytest.raises(ValueError, match="do not follow age"):
        fit_bias_correction([22.0, 30.0, 36.0], [28.0, 28.0, 28.0])
    with pytest.raises(ValueError, match="non-zero"):
        apply_bias_correction([1.0], 0.0, 1.0)


def test_baselines():
    m = baseline_metrics([0, 0, 1, 2], [0, 1, 1], n_classes=4)
    assert m["strategy"] == "majority_class" and m["constant"] == 0
    assert m["accuracy"] == pytest.approx(1 / 3) and m["balanced_accuracy"] == pytest.approx(0.5)
    assert baseline_metrics([1, 0], [0, 1], n_classes=2)["constant"] == 0  # tie: smallest class
    r = baseline_metrics([20.0, 30.0], [22.0, 28.0])
    assert r["strategy"] == "train_mean" and r["constant"] == 25.0
    assert r["mae"] == pytest.approx(3.0) and r["r2"] == pytest.approx(0.0)
