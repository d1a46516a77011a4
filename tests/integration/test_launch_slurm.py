"""The launcher and the sbatch scripts against the real local SLURM cluster (slurm/local/).

Covers issue 8's acceptance: a 4-node submitit job (4 gloo ranks on n1..n4),
`sbatch slurm/train_vae.sh` on 2 nodes, preemption with USR1 -> checkpoint ->
requeue -> resume at the saved step, and a failing job surfacing its error.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.slurm_fixtures import job_info, release_requeued, wait_for, wait_job_done, wait_job_state
from tests.integration.slurm_runs import REPO, Launcher, cvae_overrides, events, launch_cmd, records, run_env

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


def test_launch_preempt_requeue_resume(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "cvae-preempt"
    steps = 14
    launcher = Launcher(_launch(run_dir, tiny_shards, 2, steps), tmp_path, run_env(BRAINAGE_TEST_STEP_SLEEP_S="1.0"))
    job = launcher.job_id()
    slurm_jobs.append(job)
    wait_for(lambda: any(r.get("step", 0) >= 3 and "train/loss" in r for r in records(run_dir)), 240, "step 3")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for(lambda: bool(events(run_dir, "preempt")), 120, "preempt checkpoint")
    saved = events(run_dir, "preempt")[0]["step"]
    assert 0 < saved < steps
    wait_job_state(job, {"PENDING"}, timeout=120)
    release_requeued(job)
    rc, out, err = launcher.finish(timeout=600)
    assert rc == 0, err[-3000:]
    assert events(run_dir, "resume")[-1]["step"] == saved
    assert events(run_dir, "end")[-1]["step"] == steps
    assert int(job_info(job).get("Restarts", "1") or 1) >= 1


def test_sbatch_script_two_nodes_with_preemption(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "vae-sbatch"
    steps = 12
    env = {
        "CONFIG": "cvae_demo", "RUN_DIR": str(run_dir), "VENV": str(Path(sys.executable).parent.parent),
        "OVERRIDES": " ".join(cvae_overrides(tiny_shards, steps)),
        "BRAINAGE_TEST_STEP_SLEEP_S": "1.0",
    }
    os_env = run_env(**env)
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
         "slurm/train_vae.sh"], cwd=REPO, env=os_env, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]
    slurm_jobs.append(job)
    wait_for(lambda: any(r.get("step", 0) >= 3 and "train/loss" in r for r in records(run_dir)), 240, "step 3")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: bool(events(run_dir, "preempt")), 120, "preempt checkpoint")
    saved = events(run_dir, "preempt")[0]["step"]
    wait_job_state(job, {"PENDING"}, timeout=120)
    release_requeued(job)
    info = wait_job_done(job, timeout=600)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "requeueing job" in log and "training finished with exit code 0" in log, log[-3000:]
    assert events(run_dir, "start")[0]["world_size"] == 2
    assert events(run_dir, "resume")[-1]["step"] == saved
    assert events(run_dir, "end")[-1]["step"] == steps
    assert not info or info.get("JobState") == "COMPLETED", info


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
