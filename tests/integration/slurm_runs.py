"""Helpers for training runs on the local SLURM cluster: the launcher, the sbatch scripts, run folders.

Used by test_launch_slurm.py, test_slurm_semantics.py, test_slurm_timelimit.py and
test_slurm_sweep.py. Output of background processes always goes to files that are
read whole (never a pipe read in pieces).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import train_overrides
from tests.integration.slurm_fixtures import wait_for

REPO = Path(__file__).resolve().parents[2]


def run_env(**extra: str) -> dict[str, str]:
    """This environment without any SLURM/torchrun variables (a test may itself run inside a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    env.update({"OMP_NUM_THREADS": "1", "BRAINAGE_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}, **extra)
    return env


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the line being written right now
    return out


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in records(run_dir) if r.get("event") == kind]


def trained_to(run_dir: Path, step: int) -> bool:
    return any(r.get("step", 0) >= step and "train/loss" in r for r in records(run_dir))


def cvae_overrides(shards: Path, steps: int, *extra: str) -> list[str]:
    """Tiny CVAE on the cvae_demo config; no spaces, so the sbatch script can word-split them."""
    base = [o for o in train_overrides(shards, "cvae") if not o.startswith("model.")]
    model = ["model.params.latent_dim=8", "model.params.channels=[4,8,8,16]", "model.params.padding=same",
             "model.params.feature_dim=32"]
    return [*base, *model, "train.backend=ddp", f"train.max_steps={steps}", "train.epochs=100",
            "train.precision=bf16-mixed", *extra]


def launch_cmd(run_dir: Path, nodes: int, overrides: list[str], *extra: str, time_min: int = 60) -> list[str]:
    return [sys.executable, "-m", "brainage_hpc.launch", "--config", "cvae_demo", "--nodes", str(nodes),
            "--executor", "slurm", "--cpus-per-task", "1", "--time", str(time_min), "--run-dir", str(run_dir), "--wait",
            *extra, *overrides]


class Launcher:
    """The launcher as a background process whose stdout/stderr go to files.

    Never read a pipe in pieces: a ``readline()`` on a pipe followed by
    ``communicate()`` loses what the reader's buffer already held (the flaky
    ``tensorboard --logdir`` line of issue 14). Files are read whole, any time.
    """

    def __init__(self, cmd: list[str], folder: Path, env: dict[str, str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = folder / "launch.out", folder / "launch.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, text=True, stdout=out, stderr=err)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def job_id(self, timeout: float = 120) -> str:
        box: dict[str, str] = {}

        def printed() -> bool:
            m = re.search(r"submitted job (\d+)", self.out)
            if m:
                box["id"] = m.group(1)
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher ended without a job id: {self.err[-3000:]}")
            return False

        wait_for(printed, timeout, "the launcher to print its job id")
        return box["id"]

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the launcher to exit; returns (exit code, whole stdout, whole stderr)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"launcher still running after {timeout:.0f}s:\n{self.out[-2000:]}\n{self.err[-3000:]}") from None
        return rc, self.out, self.err


def sbatch_train(script: str, sbatch_args: list[str], env: dict[str, str]) -> str:
    """``sbatch --parsable ARGS slurm/<script>`` from the repository root; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", *sbatch_args, f"slurm/{script}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def sbatch_env(shards: Path, steps: int, *extra: str, **env: str) -> dict[str, str]:
    """Environment for slurm/train_vae.sh with the tiny CVAE overrides."""
    values = {"CONFIG": "cvae_demo", "VENV": str(Path(sys.executable).parent.parent),
              "OVERRIDES": " ".join(cvae_overrides(shards, steps, *extra))}
    return run_env(**{**values, **env})
