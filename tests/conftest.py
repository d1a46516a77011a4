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
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    out = tmp_path_factory.mktemp("cohort40")
    make_cohort(out, SynthConfig(n_subjects=40, seed=1), progress=False, workers=2)
    return out


@pytest.fixture(scope="session")
def tiny_shards(synthetic_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 40-subject cohort preprocessed to 32^3 at 5 mm (fast training tests)."""
    from brainage_hpc.cli import main

    out = tmp_path_factory.mktemp("shards32")
    rc = main([
        "preprocess", "--hcp-root", str(synthetic_cohort), "--out", str(out), "--shape", "32", "32", "32",
        "--voxel-mm", "5", "--shard-size", "16", "--workers", "2",
    ])
    assert rc == 0
    return out


# Tiny models for 32^3 training tests: name -> overrides
TINY_MODELS: dict[str, list[str]] = {
    "cnn3d": ["model.name=cnn3d", "model.task=regress", "model.params={depth: 2, width: 4, dropout: 0.1}"],
    "sfcn": ["model.name=sfcn", "model.task=regress", "model.params={channels: [4, 8, 16, 16]}"],
    "cvae": ["model.name=cvae", "model.task=regress", "model.params={latent_dim: 8, channels: [4, 8, 8, 16], padding: same, feature_dim: 32}"],
}


def train_overrides(shards: Path, model: str, *extra: str) -> list[str]:
    """A complete, fast CPU config as overrides (no YAML file needed)."""
    return [
        f"data.shards={shards}", "data.shape=[32,32,32]", "data.batch_size=8", "data.num_workers=0",
        "data.pin_memory=false", "data.persistent_workers=false", "data.augment.enabled=false",
        *TINY_MODELS[model], "train.lr=3e-3", "train.log_every_steps=1", "train.progress=false",
        "train.warmup_steps=0", "train.schedule=constant", *extra,
    ]
