"""``brainage synth`` / ``brainage preprocess`` -> ``brainage tabular`` end to end.

Uses the session's real 40-subject cohort and its shards (tests/conftest.py,
shared with the other integration tests, so this module adds seconds, not
minutes). It checks that

* the fast table-only replica the unit tests use (tests/unit/test_tabular.py,
  200 subjects, where the acceptance metrics are asserted) has the real cohort's
  CSVs and columns, and the real table, measured from the volumes, tracks its
  noise-free values without copying them;
* the command runs on the real cohort and beats the baseline;
* with ``--manifest`` the tabular model uses exactly the shards' splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainage_hpc.cli import main
from tests.unit.test_tabular import write_fast_tables

pytestmark = pytest.mark.slow


def _cohort_size_and_seed(cohort: Path) -> tuple[int, int]:
    cfg = json.loads((cohort / "truth.json").read_text())["config"]
    return int(cfg["n_subjects"]), int(cfg["seed"])


def test_measured_table_tracks_the_generator(synthetic_cohort: Path, tmp_path: Path) -> None:
    """freesurfer.csv is measured from the volumes: close to the generator's truth, never equal to it."""
    from scipy import stats

    n, seed = _cohort_size_and_seed(synthetic_cohort)
    fast_dir = write_fast_tables(tmp_path, n, seed=seed)
    real = pd.read_csv(synthetic_cohort / "freesurfer.csv", dtype={"Subject": str})
    fast = pd.read_csv(fast_dir / "freesurfer.csv", dtype={"Subject": str})
    assert list(real.columns) == list(fast.columns) and real["Subject"].tolist() == fast["Subject"].tolist()
    for col in ("IntraCranial_Vol", "LatVent_Vol", "TotalGray_Vol"):
        assert stats.spearmanr(real[col], fast[col]).statistic > 0.5, col  # measured: 0.68 for LatVent_Vol
        assert not np.allclose(real[col], fast[col], rtol=1e-3), col
    for name in ("unrestricted.csv", "restricted.csv"):
        assert (synthetic_cohort / name).read_text() == (fast_dir / name).read_text()


def test_cli_on_the_real_cohort(synthetic_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "tabular",
            "--table",
            str(synthetic_cohort / "freesurfer.csv"),
            "--hcp-root",
            str(synthetic_cohort),
            "--task",
            "regress",
            "--search-iters",
            "2",
            "--n-repeats",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["regression"]["mae"] < m["baselines"]["regression"]["mae"], m
    for name in ("metrics.json", "predictions.csv", "importance.csv", "importance.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0


def test_same_split_as_the_shards(synthetic_cohort: Path, tiny_shards: Path, tmp_path: Path) -> None:
    rc = main(
        [
            "tabular",
            "--table",
            str(synthetic_cohort / "freesurfer.csv"),
            "--hcp-root",
            str(synthetic_cohort),
            "--manifest",
            str(tiny_shards / "manifest.json"),
            "--task",
            "classify2",
            "--model",
            "linear",
            "--n-repeats",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    splits = json.loads((tiny_shards / "manifest.json").read_text())["splits"]
    pred = pd.read_csv(tmp_path / "predictions.csv", dtype={"subject_id": str})
    for name, ids in splits.items():
        assert sorted(pred.loc[pred["split"] == name, "subject_id"]) == sorted(map(str, ids)), name
    assert np.isin(pred["class2_pred"], [0, 1]).all()
