"""The launcher and the sbatch scripts against the real local SLURM cluster (slurm/local/).

Covers issue 8's acceptance: a 4-node submitit job (4 gloo ranks on n1..n4) and a
failing job surfacing its error. Preemption with USR1 -> checkpoint -> requeue ->
resume at the saved step, on 2 nodes, for the launcher and `sbatch slurm/train_vae.sh`,
is in test_slurm_timelimit.py (SLURM's own signal at the time limit); a USR1 sent
to one task of a job array is in test_slurm_sweep.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.slurm_fixtures import wait_job_state
from tests.integration.slurm_runs import REPO, Launcher, cvae_overrides, events, launch_cmd, run_env

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def _launch(run_dir: Path, shards: Path, nodes: int, steps: int, *extra: str) -> list[str]:
    return launch_cmd(run_dir, nodes, cvae_overrides(shards, steps, *extra))


def test_launch_four_nodes(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "cvae4"
    launcher = Launcher(_launch(run_dir, tiny_shards, 4, 6), tmp_path, run_env())
    job = launcher.job_id()
    slurm_jobs.append(job)
    info = wait_job_state(job, {"RUNNING", "COMPLETING", "COMPLETED"}, timeout=600)  # the cluster is shared
    assert info.get("NumNodes") == "4" and info.get("NodeList") == "n[1-4]", info
    rc, out, err = launcher.finish(timeout=600)
    said = f"launcher stdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    assert rc == 0, said
    assert "tensorboard --logdir" in out, said
    assert (run_dir / "last.pt").is_file() and list((run_dir / "tb").glob("events.out.tfevents.*")), said
    assert events(run_dir, "start")[0]["world_size"] == 4, said
    assert events(run_dir, "end")[-1]["step"] == 6, said
    logs = sorted((run_dir / "submitit").rglob("*_log.out"))
    assert len(logs) == 4, (logs, said)  # one per task / node


def test_failing_job_surfaces_error(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    cmd = _launch(tmp_path / "bad", tiny_shards, 1, 4, "data.shards=/nonexistent/shards")
    out = subprocess.run(cmd, env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    m = re.search(r"submitted job (\d+)", out.stdout)
    if m:
        slurm_jobs.append(m.group(1))
    assert out.returncode == 1
    assert "/nonexistent/shards" in out.stderr and "failed" in out.stderr


def test_dry_run_prints_sbatch_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "brainage_hpc.launch", "--config", "cvae_hcp", "--nodes", "4",
                          "--gpus-per-node", "4", "--partition", "gpu", "--run-dir", str(tmp_path / "r"), "--dry-run"],
                         env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    s = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append", "export SUBMITIT_PREEMPT_SIGNAL=USR1"):
        assert line in s, line
