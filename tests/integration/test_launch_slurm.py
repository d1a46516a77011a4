"""The launcher and the sbatch scripts against the real local SLURM cluster (slurm/local/).

Covers issue 8's acceptance: a 4-node submitit job (4 gloo ranks on n1..n4),
`sbatch slurm/train_vae.sh` on 2 nodes, preemption with USR1 -> checkpoint ->
requeue -> resume at the saved step, and a failing job surfacing its error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import train_overrides
from tests.integration.slurm_fixtures import (
    job_info,
    release_requeued,
    wait_for,
    wait_job_done,
    wait_job_state,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    env.update({"OMP_NUM_THREADS": "1", "BRAINAGE_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}, **extra)
    return env


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in _records(run_dir) if r.get("event") == kind]


def _overrides(shards: Path, steps: int) -> list[str]:
    """Tiny CVAE on the cvae_demo config; no spaces, so the sbatch script can word-split them."""
    base = [o for o in train_overrides(shards, "cvae") if not o.startswith("model.")]
    model = ["model.params.latent_dim=8", "model.params.channels=[4,8,8,16]", "model.params.padding=same",
             "model.params.feature_dim=32"]
    return [*base, *model, "train.backend=ddp", f"train.max_steps={steps}", "train.epochs=100", "train.precision=bf16-mixed"]


def _launch(run_dir: Path, shards: Path, nodes: int, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "brainage_hpc.launch", "--config", "cvae_demo", "--nodes", str(nodes),
            "--executor", "slurm", "--cpus-per-task", "1", "--time", "60", "--run-dir", str(run_dir), "--wait",
            *_overrides(shards, steps), *extra]


class _Launcher:
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


def test_launch_four_nodes(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "cvae4"
    launcher = _Launcher(_launch(run_dir, tiny_shards, 4, 6), tmp_path, _env())
    job = launcher.job_id()
    slurm_jobs.append(job)
    info = wait_job_state(job, {"RUNNING", "COMPLETING", "COMPLETED"}, timeout=600)  # the cluster is shared
    assert info.get("NumNodes") == "4" and info.get("NodeList") == "n[1-4]", info
    rc, out, err = launcher.finish(timeout=600)
    said = f"launcher stdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    assert rc == 0, said
    assert "tensorboard --logdir" in out, said
    assert (run_dir / "last.pt").is_file() and list((run_dir / "tb").glob("events.out.tfevents.*")), said
    assert _events(run_dir, "start")[0]["world_size"] == 4, said
    assert _events(run_dir, "end")[-1]["step"] == 6, said
    logs = sorted((run_dir / "submitit").rglob("*_log.out"))
    assert len(logs) == 4, (logs, said)  # one per task / node


def test_launch_preempt_requeue_resume(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "cvae-preempt"
    steps = 14
    launcher = _Launcher(_launch(run_dir, tiny_shards, 2, steps), tmp_path, _env(BRAINAGE_TEST_STEP_SLEEP_S="1.0"))
    job = launcher.job_id()
    slurm_jobs.append(job)
    wait_for(lambda: any(r.get("step", 0) >= 3 and "train/loss" in r for r in _records(run_dir)), 240, "step 3")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for(lambda: bool(_events(run_dir, "preempt")), 120, "preempt checkpoint")
    saved = _events(run_dir, "preempt")[0]["step"]
    assert 0 < saved < steps
    wait_job_state(job, {"PENDING"}, timeout=120)
    release_requeued(job)
    rc, out, err = launcher.finish(timeout=600)
    assert rc == 0, err[-3000:]
    assert _events(run_dir, "resume")[-1]["step"] == saved
    assert _events(run_dir, "end")[-1]["step"] == steps
    assert int(job_info(job).get("Restarts", "1") or 1) >= 1


def test_sbatch_script_two_nodes_with_preemption(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "vae-sbatch"
    steps = 12
    env = {
        "CONFIG": "cvae_demo", "RUN_DIR": str(run_dir), "VENV": str(Path(sys.executable).parent.parent),
        "OVERRIDES": " ".join(_overrides(tiny_shards, steps)),
        "BRAINAGE_TEST_STEP_SLEEP_S": "1.0",
    }
    os_env = _env(**env)
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
         "slurm/train_vae.sh"], cwd=REPO, env=os_env, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]
    slurm_jobs.append(job)
    wait_for(lambda: any(r.get("step", 0) >= 3 and "train/loss" in r for r in _records(run_dir)), 240, "step 3")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: bool(_events(run_dir, "preempt")), 120, "preempt checkpoint")
    saved = _events(run_dir, "preempt")[0]["step"]
    wait_job_state(job, {"PENDING"}, timeout=120)
    release_requeued(job)
    info = wait_job_done(job, timeout=600)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "requeueing job" in log and "training finished with exit code 0" in log, log[-3000:]
    assert _events(run_dir, "start")[0]["world_size"] == 2
    assert _events(run_dir, "resume")[-1]["step"] == saved
    assert _events(run_dir, "end")[-1]["step"] == steps
    assert not info or info.get("JobState") == "COMPLETED", info


def test_failing_job_surfaces_error(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    cmd = _launch(tmp_path / "bad", tiny_shards, 1, 4, "data.shards=/nonexistent/shards")
    out = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    m = re.search(r"submitted job (\d+)", out.stdout)
    if m:
        slurm_jobs.append(m.group(1))
    assert out.returncode == 1
    assert "/nonexistent/shards" in out.stderr and "failed" in out.stderr


def test_dry_run_prints_sbatch_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "brainage_hpc.launch", "--config", "cvae_hcp", "--nodes", "4",
                          "--gpus-per-node", "4", "--partition", "gpu", "--run-dir", str(tmp_path / "r"), "--dry-run"],
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    s = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append", "export SUBMITIT_PREEMPT_SIGNAL=USR1"):
        assert line in s, line
