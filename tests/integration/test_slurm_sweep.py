"""Issue 19: a sweep is one SLURM job array on the real local cluster.

A 2x2 sweep (lr x seed) on tiny shards runs as one array with 4 run folders; one
task is preempted with USR1 mid-way and resumes from its checkpoint; the summary
written at the end of ``--wait`` (and by ``brainage sweep-summary``) has 4 rows
with their best metric; TensorBoard's hparams plugin lists 4 runs.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.slurm_fixtures import release_requeued, wait_for, wait_job_state
from tests.integration.slurm_runs import REPO, Launcher, cvae_overrides, events, run_env, trained_to

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

STEPS = 9  # 3 epochs of 3 steps: validation (val/loss) after each


def _hparams_sessions(sweep_dir: Path) -> dict[str, dict[str, object]]:
    """run folder -> hparams, read back through TensorBoard's hparams plugin data."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions: dict[str, dict[str, object]] = {}
    for events_file in sorted(sweep_dir.glob("*/tb/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events_file.parent))
        acc.Reload()
        try:
            raw = acc.PluginTagToContent("hparams").get("_hparams_/session_start_info")
        except KeyError:  # the scalars' event file: no hparams plugin data
            continue
        if raw is None:
            continue
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        values = {}
        for key, value in data.session_start_info.hparams.items():
            kind = value.WhichOneof("kind")
            values[key] = getattr(value, kind) if kind else None
        run = events_file.relative_to(sweep_dir).parts[0]
        sessions[run] = values
    return sessions


def test_sweep_is_one_array_with_resumable_tasks(slurm_cluster, slurm_jobs, tiny_shards, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "brainage_hpc.launch", "--config", "cvae_demo", "--executor", "slurm", "--nodes", "1",
           "--cpus-per-task", "1", "--time", "60", "--run-dir", str(sweep_dir), "--max-parallel", "4", "--wait",
           "--sweep", "train.lr=3e-3,1e-3", "--sweep", "train.seed=0,1",
           *[o for o in cvae_overrides(tiny_shards, STEPS) if not o.startswith("train.lr=")]]
    launcher = Launcher(cmd, tmp_path / "launcher", run_env(BRAINAGE_TEST_STEP_SLEEP_S="1.0"))
    array = launcher.job_id()
    slurm_jobs.append(array)
    runs = ["lr=3e-3,seed=0", "lr=3e-3,seed=1", "lr=1e-3,seed=0", "lr=1e-3,seed=1"]
    wait_for(lambda: f"{array}_3" in launcher.out, 60, "the launcher to list the array tasks")
    out = launcher.out
    for i, run in enumerate(runs):
        assert f"  {array}_{i}  {sweep_dir / run}" in out, out

    # Preempt task 1 mid-way, the way SLURM's --signal would (USR1 to its steps).
    task, run_dir = f"{array}_1", sweep_dir / runs[1]
    wait_for(lambda: trained_to(run_dir, 2), 600, f"{task} to train 2 steps")
    subprocess.run(["scancel", "--signal=USR1", task], check=True, timeout=30)
    wait_for(lambda: bool(events(run_dir, "preempt")), 120, f"{task}'s preemption checkpoint")
    saved = events(run_dir, "preempt")[0]["step"]
    assert 0 < saved < STEPS
    wait_job_state(task, {"PENDING"}, timeout=120)
    release_requeued(task)

    rc, out, err = launcher.finish(timeout=900)
    said = f"launcher stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert rc == 0, said
    assert events(run_dir, "resume")[-1]["step"] == saved, said
    for run in runs:
        assert events(sweep_dir / run, "end")[-1]["step"] == STEPS, (run, said)
    assert f"sweep {array}: 4 of 4 runs finished" in out, said

    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert sorted(r["run"] for r in rows) == sorted(runs), rows
    assert all(r["status"] == "finished" and r["metric"] == "val/loss" and r["best"] and r["steps"] == str(STEPS)
               for r in rows), rows
    bests = [float(r["best"]) for r in rows]
    assert bests == sorted(bests), rows  # best (lowest val/loss) first
    assert {r["overrides"] for r in rows} == {f"train.lr={lr} train.seed={s}" for lr in ("3e-3", "1e-3") for s in (0, 1)}
    assert re.search(r"^\| run \| overrides \| best val/loss \|", out, flags=re.M), said

    again = subprocess.run([sys.executable, "-m", "brainage_hpc.cli", "sweep-summary", str(sweep_dir),
                            "--out", str(tmp_path / "summary")], env=run_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "summary" / "sweep_summary.md").read_text().count("| finished |") == 4

    sessions = _hparams_sessions(sweep_dir)
    assert sorted(sessions) == sorted(runs), sessions
    assert sorted(float(h["lr"]) for h in sessions.values()) == [1e-3, 1e-3, 3e-3, 3e-3], sessions
