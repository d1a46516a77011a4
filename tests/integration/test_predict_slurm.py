"""Cohort scoring as a SLURM array on the real local cluster: sbatch script and submitit launcher.

Issue 16.2's acceptance: 200 scans, 4 array tasks, one task preempted by a real USR1
mid-way and requeued: the merged CSV has 200 rows and every scan was scored exactly
once. Also: scancel (SIGTERM) stops a task without requeue, the merge names what is
missing, and resubmitting the task finishes the run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from brainage_hpc.evaluation.parts import parts_dir_for, read_records
from tests import predict_fixtures
from tests.integration.slurm_fixtures import job_info, release_requeued, wait_for, wait_job_done, wait_job_state
from tests.predict_fixtures import make_scans

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
REPO = Path(__file__).resolve().parents[2]

synth_subjects = predict_fixtures.synth_subjects
tiny_model = predict_fixtures.tiny_model


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, **extra)
    return env


def _records(out: Path, part: str | None = None) -> list[dict]:
    recs: list[dict] = []
    for p in sorted(parts_dir_for(out).glob(part or "part-*.jsonl")):
        recs += read_records(p)[0]
    return recs


def _scans_in(out: Path, part: str) -> int:
    return sum(1 for r in _records(out, part) if r["kind"] == "scan")


def _sbatch_array(array: str, model: Path, inputs: Path, out: Path, hold: float) -> str:
    env = _env(CHECKPOINT=str(model), INPUT=str(inputs), OUT=str(out), PREDICT_ARGS="--batch-size 1 --no-progress",
               WORKERS="1", BRAINAGE_PREDICT_HOLD_S=str(hold))
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--array={array}", "--cpus-per-task=1", "--time=10",
         f"--output={out.parent}/slurm-%A_%a.out", "slurm/predict_array.sh"],
        capture_output=True, text=True, timeout=30, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _assert_each_scan_scored_once(out: Path, n: int) -> None:
    df = pd.read_csv(out)
    assert len(df) == n and df["pred_age"].notna().all() and df["error"].isna().all()
    ok = Counter(r["file"] for r in _records(out) if r["kind"] == "scan" and not r["error"])
    assert len(ok) == n and set(ok.values()) == {1}, Counter(ok.values())
    assert sorted(df["file"]) == sorted(ok)


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.parent.glob("slurm-*.out")))


def test_sbatch_array_200_scans_one_task_preempted_by_usr1(slurm_cluster, slurm_jobs, tiny_model, synth_subjects, tmp_path):
    make_scans(tmp_path / "in", 200, synth_subjects)
    out = tmp_path / "pred.csv"
    array = _sbatch_array("0-3", tiny_model, tmp_path / "in", out, hold=0.1)
    slurm_jobs += [array] + [f"{array}_{i}" for i in range(4)]
    victim = f"{array}_1"
    part = "part-00001-of-00004.jsonl"
    wait_for(lambda: _scans_in(out, part) >= 5, 600, f"5 records of {victim}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", victim], check=True, timeout=30)  # like --signal=B:USR1@120
    wait_job_state(victim, {"PENDING"}, 120, reason="BeginTime")
    n_before = _scans_in(out, part)
    assert 5 <= n_before < 50, n_before
    release_requeued(victim)
    for i in range(4):
        wait_job_done(f"{array}_{i}", timeout=900)
    wait_for(out.exists, 60, "the merged CSV", interval=1.0)
    assert job_info(victim).get("Restarts", "1") == "1"
    _assert_each_scan_scored_once(out, 200)
    sessions = [r for r in _records(out, part) if r["kind"] == "session"]
    assert [s["event"] for s in sessions] == ["start", "end", "start", "end"], _logs(out)
    assert sessions[1]["stopped_by"] == 10 and sessions[2]["skipped"] == sessions[1]["scored"]  # SIGUSR1, resumed
    log = (tmp_path / f"slurm-{array}_1.out").read_text()
    assert "batch shell got USR1" in log and "requeueing" in log and "Traceback" not in log
    assert (tmp_path / "pred_report.md").exists()


def test_sbatch_scancel_stops_without_requeue_and_resubmission_finishes(
        slurm_cluster, slurm_jobs, tiny_model, synth_subjects, tmp_path, capsys):
    from brainage_hpc.cli import main

    make_scans(tmp_path / "in", 30, synth_subjects)
    out = tmp_path / "pred.csv"
    array = _sbatch_array("0-1", tiny_model, tmp_path / "in", out, hold=0.3)
    slurm_jobs += [array, f"{array}_0", f"{array}_1"]
    part = "part-00001-of-00002.jsonl"
    wait_for(lambda: _scans_in(out, part) >= 2, 600, "2 records of task 1")
    subprocess.run(["scancel", f"{array}_1"], check=True, timeout=30)  # SIGTERM: stop, do not requeue
    info = wait_job_done(f"{array}_1", timeout=120)
    wait_job_done(f"{array}_0", timeout=600)
    assert info.get("Restarts", "0") == "0" and info.get("JobState") == "CANCELLED", info
    assert not out.exists() or pd.read_csv(out)["pred_age"].isna().any()
    assert main(["predict", "--merge", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"part part-00001-of-00002\.jsonl has no record for \d+ scan\(s\)", err), err

    again = _sbatch_array("1", tiny_model, tmp_path / "in", out, hold=0.0)  # resubmit only the stopped task
    slurm_jobs += [again, f"{again}_1"]
    wait_job_done(f"{again}_1", timeout=600)
    wait_for(lambda: out.exists() and pd.read_csv(out)["pred_age"].notna().all(), 60, "the merged CSV", interval=1.0)
    _assert_each_scan_scored_once(out, 30)


def test_launch_predict_requeues_a_task_after_usr1(slurm_cluster, slurm_jobs, tiny_model, synth_subjects, tmp_path):
    make_scans(tmp_path / "in", 40, synth_subjects)
    out = tmp_path / "pred.csv"
    cmd = [sys.executable, "-m", "brainage_hpc.launch", "predict", "--checkpoint", str(tiny_model),
           "--input", str(tmp_path / "in"), "--out", str(out), "--tasks", "2", "--cpus-per-task", "1", "--time", "30",
           "--batch-size", "1", "--wait"]
    proc = subprocess.Popen(cmd, env=_env(BRAINAGE_PREDICT_HOLD_S="0.4"), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        m = re.search(r"submitted array (\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        array = m.group(1)
        slurm_jobs += [array, f"{array}_0", f"{array}_1"]
        part = "part-00001-of-00002.jsonl"
        wait_for(lambda: _scans_in(out, part) >= 3, 600, "3 records of task 1")
        subprocess.run(["scancel", "--signal=USR1", f"{array}_1"], check=True, timeout=30)
        wait_job_state(f"{array}_1", {"PENDING"}, 120, reason="BeginTime")
        release_requeued(f"{array}_1")
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "40 scan(s): 40 scored, 0 failed, 0 not scored" in stdout + stderr
    assert "Bypassing sacct error" not in stderr
    _assert_each_scan_scored_once(out, 40)
    sessions = [r for r in _records(out, part) if r["kind"] == "session"]
    assert [s.get("stopped_by") for s in sessions if s["event"] == "end"] == [10, None]
    result = json.dumps(sorted(p.name for p in (parts_dir_for(out) / "logs").rglob("*_result.pkl")))
    assert result.count("_result.pkl") == 2
