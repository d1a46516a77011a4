"""Issue 14's SLURM semantics on the real local cluster, one test per case.

- ``scancel JOB`` ends the job, for the sbatch script and for the launcher: only
  the USR1 warning from ``--signal`` may requeue (SIGTERM checkpoints and stops).
- Resubmitting ``sbatch slurm/train_vae.sh`` continues the run (the default run
  folder does not depend on the job id).
- Restarts that save no new checkpoint (``--time`` shorter than the signal lead)
  stop requeueing after ``MAX_STALLED_REQUEUES``.
- ``launch --wait`` prints a short progress line and none of submitit's
  "Bypassing sacct error" warnings (there is no slurmdbd here).
- A hung rank frees the allocation after the process-group timeout
  (``DIST_TIMEOUT_S`` -> ``train.dist_timeout_s`` and ``srun --wait``), not 30 min.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.slurm_fixtures import release_requeued, wait_for, wait_job_state
from tests.integration.slurm_runs import (
    Launcher,
    cvae_overrides,
    events,
    launch_cmd,
    run_env,
    sbatch_env,
    sbatch_train,
    trained_to,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# A job SLURM is ending shows COMPLETING until every process of it (the batch
# shell included) is gone; a requeue issued by the job itself happens before
# that. So once the state is past COMPLETING it is final for our purpose.
_SETTLED = {"PENDING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY"}


def _settled(job: str, timeout: float = 300) -> dict[str, str]:
    return wait_job_state(job, _SETTLED, timeout=timeout)


def test_scancel_ends_sbatch_job(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    # Short steps: the trainer reacts to SIGTERM well inside KillWait (2 s here), as on a real cluster.
    env = sbatch_env(tiny_shards, 400, RUN_DIR=str(run_dir), BRAINAGE_TEST_STEP_SLEEP_S="0.2")
    job = sbatch_train("train_vae.sh", ["--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out"], env)
    slurm_jobs.append(job)
    wait_for(lambda: trained_to(run_dir, 2), 600, "step 2")
    subprocess.run(["scancel", job], check=True, timeout=30)
    info = _settled(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0", (info, log[-3000:])
    # The batch shell must know it was told to stop (main called SIGTERM "USR1" and requeued
    # whenever srun passed the trainer's exit 3 on within its grace period).
    assert "batch shell got TERM" in log and "not requeueing" in log and "requeueing job" not in log, log[-3000:]


def test_scancel_ends_launcher_job(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = Launcher(launch_cmd(run_dir, 1, cvae_overrides(tiny_shards, 400)), tmp_path,
                        run_env(BRAINAGE_TEST_STEP_SLEEP_S="0.2"))
    job = launcher.job_id()
    slurm_jobs.append(job)
    wait_for(lambda: trained_to(run_dir, 2), 600, "step 2")
    subprocess.run(["scancel", job], check=True, timeout=30)
    info = _settled(job)
    assert info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0", info
    rc, out, err = launcher.finish(timeout=300)
    assert rc == 1, (out[-2000:], err[-3000:])
    assert f"launch: job {job} failed" in err, err[-3000:]


def test_resubmitted_sbatch_job_continues_run(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    steps = 12
    name = f"resub-{tmp_path.name}"
    args = [f"--job-name={name}", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out"]
    overrides = ("train.ckpt_every_steps=2",)
    run_dir = tmp_path / f"{name}-cvae_demo"  # RUNS_ROOT/<job name>-<config name>, the script's default
    first = sbatch_train("train_vae.sh", args, sbatch_env(tiny_shards, steps, *overrides, RUNS_ROOT=str(tmp_path),
                                                          BRAINAGE_TEST_STEP_SLEEP_S="0.5"))
    slurm_jobs.append(first)
    wait_for(lambda: trained_to(run_dir, 4) and any(run_dir.glob("ckpt-step*.pt")), 600, "a checkpoint at step >= 2")
    subprocess.run(["scancel", first], check=True, timeout=30)
    _settled(first)
    second = sbatch_train("train_vae.sh", args, sbatch_env(tiny_shards, steps, *overrides, RUNS_ROOT=str(tmp_path)))
    slurm_jobs.append(second)
    info = wait_job_state(second, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    log = (tmp_path / f"slurm-{second}.out").read_text()
    assert info.get("JobState") == "COMPLETED", (info, log[-3000:])
    resumed = events(run_dir, "resume")
    assert resumed and resumed[-1]["step"] >= 2, log[-3000:]
    assert events(run_dir, "end")[-1]["step"] == steps


def _stalled_venv(tmp_path: Path) -> Path:
    """A python environment whose `brainage train` never gets to run its first step.

    It stands for a trainer that USR1 reaches before it can checkpoint (the signal
    lead is longer than the time limit): killed by the signal, nothing saved.
    Everything else (the requeue guard) runs the real interpreter.
    """
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"""#!/bin/bash
case " $* " in *" brainage_hpc.cli train "*) exec sleep 600 ;; esac
exec {sys.executable} "$@"
""")
    py.chmod(0o755)
    return venv


def _step_running(job: str) -> bool:
    """An srun step (``JOB.0``, not ``JOB.batch``) is running: the trainer's processes exist."""
    out = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return any(re.fullmatch(rf"{job}\.\d+", line.strip()) for line in out.stdout.splitlines())


def test_requeue_stops_after_restarts_without_progress(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = sbatch_env(tiny_shards, 10, RUN_DIR=str(run_dir), VENV=str(_stalled_venv(tmp_path)), MAX_STALLED_REQUEUES="1")
    log_path = tmp_path / "slurm.out"
    job = sbatch_train("train_vae.sh", ["--cpus-per-task=1", f"--output={log_path}"], env)
    slurm_jobs.append(job)
    for restart in (0, 1):
        wait_for(lambda: log_path.exists() and f"restart {restart}: newest checkpoint" in log_path.read_text(), 600,
                 f"restart {restart} to start")
        wait_for(lambda: _step_running(job), 120, f"restart {restart}'s training step")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        if restart == 0:
            wait_job_state(job, {"PENDING"}, timeout=120)
            release_requeued(job)
    info = _settled(job)
    log = log_path.read_text()
    assert info.get("JobState") == "FAILED" and info.get("Restarts") == "1", (info, log[-3000:])
    assert "requeue: no checkpoint after step 0 in this restart (1 of 1 allowed in a row)" in log, log[-3000:]
    assert "not requeueing: 2 restarts in a row saved no checkpoint after step 0" in log, log[-3000:]


def test_launch_wait_shows_progress_without_sacct_noise(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = Launcher(launch_cmd(run_dir, 1, cvae_overrides(tiny_shards, 4)), tmp_path, run_env())
    slurm_jobs.append(launcher.job_id())
    rc, out, err = launcher.finish(timeout=600)
    assert rc == 0, (out[-2000:], err[-3000:])
    assert re.search(r"^job \d+ \S+ step 4/4$", out, flags=re.M), out
    assert "Bypassing sacct error" not in out + err, err[-3000:]


def _rank_pid(job: str, rank: int) -> int | None:
    """The pid of ``brainage train`` rank ``rank`` of ``job`` (all 'nodes' run on this machine)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"brainage_hpc.cli" in cmdline and f"SLURM_JOB_ID={job}".encode() in environ
                and f"SLURM_PROCID={rank}".encode() in environ):
            return int(proc.name)
    return None


def test_hung_rank_frees_the_allocation(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = sbatch_env(tiny_shards, 400, RUN_DIR=str(run_dir), DIST_TIMEOUT_S="10", BRAINAGE_TEST_STEP_SLEEP_S="0.5")
    log_path = tmp_path / "slurm.out"
    job = sbatch_train("train_vae.sh", ["--nodes=2", "--cpus-per-task=1", f"--output={log_path}"], env)
    slurm_jobs.append(job)
    wait_for(lambda: trained_to(run_dir, 2), 600, "step 2")
    pid = _rank_pid(job, 1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, signal.SIGSTOP)  # hung, not dead: its connections stay open, collectives wait for it
    try:
        # 10 s process-group timeout on rank 0, then srun --wait=20 ends rank 1; NCCL/gloo defaults would hold 30 min
        info = wait_job_state(job, {"FAILED", "COMPLETED", "CANCELLED", "TIMEOUT", "PENDING"}, timeout=400)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = log_path.read_text()
    assert info.get("JobState") == "FAILED" and info.get("Restarts") == "0", (info, log[-3000:])
    assert "training finished with exit code" in log and "requeueing job" not in log, log[-3000:]
