"""Fixtures of the predict tests: a tiny model bundle (untrained, built in a second) and small real NIfTI scans.

Scoring does not need a trained model: these tests check what happens to every scan
(recorded once, errors isolated, resumable), not how good the ages are.
Import what you need into a test module::

    from tests.predict_fixtures import tiny_model, scan_dir  # noqa: F401
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

SHAPE = (16, 16, 16)
VOXEL_MM = 10.0


TINY_PARAMS = "{depth: 2, width: 4, dropout: 0.1, padding: same}"
DEMO_PARAMS = "{depth: 3, width: 8, dropout: 0.1, padding: valid}"  # cnn_demo.yaml's network


def make_model_bundle(path: Path, shape: tuple[int, int, int] = SHAPE, voxel_mm: float = VOXEL_MM,
                      task: str = "regress", seed: int = 0, params: str = TINY_PARAMS, spread: float = 1.0,
                      extra: dict | None = None) -> Path:
    """Write an exported ``model.pt`` of a CNN with random weights and a preprocessing config.

    ``spread`` scales the last layer so that predictions differ by years between inputs
    (a random network otherwise answers nearly the same age for everything).
    """
    import torch

    from brainage_hpc.config import config_to_dict, load_config
    from brainage_hpc.engine.checkpoint import save_sealed
    from brainage_hpc.ingest.preprocess import PreprocessConfig
    from brainage_hpc.models.registry import build_model

    cfg = load_config("cnn_demo", [
        f"data.shape=[{shape[0]},{shape[1]},{shape[2]}]", "model.name=cnn3d", f"model.task={task}",
        f"model.params={params}",
    ])
    torch.manual_seed(seed)
    model = build_model(cfg.model, shape).eval()
    with torch.no_grad():
        model.fc.weight.mul_(spread)
    pcfg = PreprocessConfig(shape=shape, voxel_mm=voxel_mm)
    bundle = {
        "format": "brainage-model",
        "state_dict": model.state_dict(),
        "config": config_to_dict(cfg),
        "shape": list(shape),
        "preprocess": pcfg.to_dict(),
        "affine": None,
        "step": 0,
        **(extra or {}),
    }
    save_sealed(bundle, path)
    return path


def subject_scans(cohort: Path) -> list[Path]:
    """The T1w files of a synthetic HCP-layout cohort (not the truth maps beside them), or of a flat folder."""
    return sorted(cohort.glob("*/T1w/*.nii.gz")) or sorted(cohort.glob("*.nii.gz"))


def make_scans(folder: Path, n: int, source: Path) -> list[Path]:
    """``n`` distinct scan files in ``folder`` (copies of the synthetic subjects, cycled)."""
    subjects = subject_scans(source)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        dst = folder / f"scan-{i:04d}_T1w.nii.gz"
        shutil.copyfile(subjects[i % len(subjects)], dst)
        out.append(dst)
    return out


def write_volume(path: Path, data: np.ndarray, voxel_mm: float) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([voxel_mm] * 3 + [1.0])), path)
    return path


@pytest.fixture(scope="session")
def synth_subjects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic skull-stripped subjects at 6 mm (about 15 kB each)."""
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    out = tmp_path_factory.mktemp("synth6mm")
    make_cohort(out, SynthConfig(n_subjects=4, seed=3, voxel_mm=6.0), progress=False)
    return out


def make_run_dir(folder: Path, **kwargs) -> Path:
    """A run folder with ``last.pt`` as training leaves it (``model`` + metadata), from :func:`make_model_bundle`."""

    from brainage_hpc.engine.checkpoint import read_checkpoint, save_sealed

    folder.mkdir(parents=True, exist_ok=True)
    bundle = read_checkpoint(make_model_bundle(folder / ".bundle.pt", **kwargs))
    (folder / ".bundle.pt").unlink()
    ckpt = {"model": bundle.pop("state_dict"), **{k: v for k, v in bundle.items() if k != "format"}}
    save_sealed(ckpt, folder / "last.pt")
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_bundle(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture()
def scan_dir(tmp_path: Path, synth_subjects: Path) -> Path:
    """A folder of 6 scan files."""
    make_scans(tmp_path / "scans", 6, synth_subjects)
    return tmp_path / "scans"


@pytest.fixture()
def unwritable_dir(tmp_path: Path):
    """A folder nobody can create files in: a read-only tmpfs when root may mount, else chmod 555."""
    import os
    import subprocess

    folder = tmp_path / "readonly"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
        if not mounted:
            yield Path("/sys/brainage-test")  # sysfs refuses new files, even for root
            return
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)
