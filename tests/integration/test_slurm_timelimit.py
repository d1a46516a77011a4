"""Issue 17.5: real time-limit preemption on the local cluster, no scancel.

An sbatch job (``--time=2 --signal=B:USR1@50``) and a launcher job (``--time 2``,
``launch.signal_delay_s=50``), 2 nodes (2 gloo ranks) each, plan more training than
fits in 2 minutes.
SLURM itself sends USR1 before the limit; each job checkpoints, requeues itself
and resumes until the planned step count, with no step trained twice (checked in
metrics.jsonl and in the raw TensorBoard event files).

Both jobs run at the same time to halve the wall time (3-5 min here: slurmctld
looks at signal times once a minute, so USR1 comes 10-70 s after each start;
requeued jobs are released at once with ``scontrol update StartTime=now``).

Set ``BRAINAGE_STEP_LOG_OUT=path.json`` to keep the sbatch run's step log (the
common benchmark JSON shape, for BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.integration.slurm_fixtures import job_info, release_requeued
from tests.integration.slurm_runs import (
    Launcher,
    cvae_overrides,
    events,
    launch_cmd,
    records,
    run_env,
    sbatch_env,
    sbatch_train,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# 70 x (1 s + compute): more than one 2-minute job can train before its USR1. SLURM checks
# signal times once a minute, so USR1 comes 10-70 s after a start: expect 2-4 restarts.
STEPS = 70
STEP_SLEEP_S = "1.0"


def _tensorboard_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    """Every step of ``tag`` in every raw event file (TensorBoard's own purging not applied)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == tag for v in event.summary.value):
                steps.append(int(event.step))
    return steps


def _check_run(run_dir: Path, said: str) -> list[int]:
    preempts = [e["step"] for e in events(run_dir, "preempt")]
    resumes = [e["step"] for e in events(run_dir, "resume")]
    assert preempts and resumes == preempts, f"preempt at {preempts}, resumed at {resumes}\n{said}"
    assert all(e["world_size"] == 2 for e in events(run_dir, "start")), said
    assert events(run_dir, "end")[-1]["step"] == STEPS and events(run_dir, "end")[-1]["outcome"] == "completed", said
    trained = [r["step"] for r in records(run_dir) if "train/loss" in r]
    assert trained == list(range(1, STEPS + 1)), f"steps in metrics.jsonl not 1..{STEPS} once each: {trained}\n{said}"
    tb = _tensorboard_steps(run_dir)
    assert sorted(tb) == list(range(1, STEPS + 1)), f"TensorBoard train/loss steps not 1..{STEPS} once each: {sorted(tb)}"
    return preempts


def _release_when_requeued(jobs: list[str], done: dict[str, bool]) -> None:
    """Release every requeued job at once instead of after its 120 s BeginTime."""
    for job in jobs:
        info = job_info(job)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            release_requeued(job)
        done[job] = info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") or not info


def _step_log(run_dir: Path, log: str, job: str) -> dict:
    """The sbatch run's step log in the common benchmark JSON shape (contract 8)."""
    from benchmarks.common import make_result

    rows, current = [], None
    for rec in records(run_dir):
        kind = rec.get("event")
        if kind == "start":
            current = {"first": rec["step"] + 1, "start_time": rec["time"]}
        elif kind in ("preempt", "end") and current is not None:
            rows.append([len(rows), current["first"], rec["step"], kind, round(rec["time"] - current["start_time"], 1)])
            current = None
    result = make_result(
        "timelimit_preemption", "Time-limit preemption on SLURM (sbatch --time=2 --signal=B:USR1@50)", [],
        quick=False, config={"steps": STEPS, "step_sleep_s": float(STEP_SLEEP_S), "time_min": 2, "signal": "B:USR1@50", "nodes": 2,
                             "cluster": "local slurm 22.05, 4 nodes x 2 CPUs on one machine"},
        headers=["restart", "first step", "last step", "ended by", "seconds training"], rows=rows, ratio=None,
        notes=[f"job {job}: every step 1..{STEPS} trained once (metrics.jsonl and TensorBoard event files);"
               " requeued jobs released with scontrol update StartTime=now (SLURM would wait 120 s)",
               "the machine is shared by several developers: durations are noisy"],
        job_log=[line for line in log.splitlines() if line.startswith("[")],
    )
    result["command"] = (f"BRAINAGE_STEP_LOG_OUT={os.environ.get('BRAINAGE_STEP_LOG_OUT')} "
                         "python -m pytest tests/integration/test_slurm_timelimit.py")
    return result


def test_time_limit_checkpoint_requeue_resume(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    sb_dir, la_dir = tmp_path / "sbatch-run", tmp_path / "launch-run"
    log_path = tmp_path / "slurm.out"
    sb_job = sbatch_train(
        "train_vae.sh", ["--nodes=2", "--time=2", "--signal=B:USR1@50", "--cpus-per-task=1", f"--output={log_path}"],
        sbatch_env(tiny_shards, STEPS, RUN_DIR=str(sb_dir), BRAINAGE_TEST_STEP_SLEEP_S=STEP_SLEEP_S),
    )
    slurm_jobs.append(sb_job)
    launcher = Launcher(launch_cmd(la_dir, 2, cvae_overrides(tiny_shards, STEPS), "launch.signal_delay_s=50", time_min=2),
                        tmp_path / "launcher", run_env(BRAINAGE_TEST_STEP_SLEEP_S=STEP_SLEEP_S))
    la_job = launcher.job_id()
    slurm_jobs.append(la_job)

    done: dict[str, bool] = {}
    deadline = time.monotonic() + 1200  # a shared cluster: jobs may queue behind others
    while not (done.get(sb_job) and launcher.proc.poll() is not None):
        assert time.monotonic() < deadline, f"not done after 20 min: {job_info(sb_job)} {job_info(la_job)}"
        _release_when_requeued([sb_job, la_job], done)
        time.sleep(1.0)
    rc, out, err = launcher.finish(timeout=60)
    log = log_path.read_text()

    said = f"sbatch log:\n{log[-3000:]}"
    assert "batch shell got USR1" in log and "requeueing job" in log and "training finished with exit code 0" in log, said
    _check_run(sb_dir, said)
    said = f"launcher stdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    assert rc == 0, said
    _check_run(la_dir, said)

    if os.environ.get("BRAINAGE_STEP_LOG_OUT"):
        out_path = Path(os.environ["BRAINAGE_STEP_LOG_OUT"])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(_step_log(sb_dir, log, sb_job), indent=1, default=str) + "\n")
        print(f"step log written to {out_path}", file=sys.stderr)
