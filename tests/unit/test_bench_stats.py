"""The trainer-overhead verdict follows from its bootstrap CI, never from a fixed sentence."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.trainer_overhead import bootstrap_ratio_ci, describe_ci


def test_bootstrap_ci_brackets_the_ratio_of_means() -> None:
    rng = np.random.default_rng(0)
    bare = list(10 + rng.normal(0, 0.5, 20))
    ours = [b * 1.10 for b in bare]  # exactly 10 % slower in every pair
    point, lo, hi = bootstrap_ratio_ci(ours, bare)
    assert point == pytest.approx(1.10) and lo == pytest.approx(1.10) and hi == pytest.approx(1.10)
    noisy = [b * 1.02 + e for b, e in zip(bare, rng.normal(0, 1.0, 20))]
    point, lo, hi = bootstrap_ratio_ci(noisy, bare)
    assert lo < point < hi and hi - lo > 0.02
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0], [1.0])


@pytest.mark.parametrize("lo, hi, words", [
    (1.01, 1.04, "slower by 1.0 % to 4.0 %"),
    (0.95, 0.99, "faster by 1.0 % to 5.0 %"),
    (0.98, 1.03, "no difference resolved: between 2.0 % faster and 3.0 % slower"),
])
def test_the_sentence_is_read_off_the_ci(lo: float, hi: float, words: str) -> None:
    text = describe_ci((lo + hi) / 2, lo, hi, 1.05)
    assert words in text and "within run-to-run spread" not in text
