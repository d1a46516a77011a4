"""Shared fixtures: a small synthetic HCP cohort made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 subjects, 2 mm, seed 1: the cohort of issue 3's acceptance test."""
    from brainage_hpc.data.synthetic import SynthConfig, make_cohort

    out = tmp_path_factory.mktemp("cohort40")
    make_cohort(out, SynthConfig(n_subjects=40, seed=1), progress=False, workers=2)
    return out
