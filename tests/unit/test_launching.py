"""The launcher's pure parts: sweep grids, sbatch options, the requeue guard, run status, sweep summary.

The SLURM behaviour itself is tested on the real local cluster in
tests/integration/test_launch_slurm.py and test_slurm_semantics.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from brainage_hpc.config import ConfigError, load_config
from brainage_hpc.launching import requeue
from brainage_hpc.launching.executor import dry_run_script, parse_mem_gb, time_limit_warning
from brainage_hpc.launching.runstate import checkpointed_step, read_metrics, run_status
from brainage_hpc.launching.summary import write_summary
from brainage_hpc.launching.sweep import expand_grid, load_sweep_file, parse_sweep_arg, write_sweep
from brainage_hpc.launching.waiting import quiet_sacct_warnings

REPO = Path(__file__).resolve().parents[2]


def _write_run(run_dir: Path, losses: list[float], total: int, outcome: str | None, ckpts: tuple[int, ...] = ()) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train: {monitor: val/loss, monitor_mode: min}\n")
    lines = [json.dumps({"event": "start", "step": 0, "total_steps": total})]
    for i, loss in enumerate(losses, 1):
        lines.append(json.dumps({"step": i * 2, "train/loss": 1.0}))
        lines.append(json.dumps({"step": i * 2, "epoch": i, "val/loss": loss}))
    if outcome:
        lines.append(json.dumps({"event": "end", "step": len(losses) * 2, "outcome": outcome}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for step in ckpts:
        (run_dir / f"ckpt-step{step:08d}.pt").write_bytes(b"x")


# ----------------------------------------------------------------------------- sweeps


def test_sweep_grid_names_and_order():
    axes = [parse_sweep_arg("train.lr=1e-3,3e-4,1e-4"), parse_sweep_arg("train.seed=0,1,2")]
    points = expand_grid(axes)
    assert len(points) == 9
    assert points[0].name == "lr=1e-3,seed=0" and points[0].overrides == ("train.lr=1e-3", "train.seed=0")
    assert points[-1].name == "lr=1e-4,seed=2"
    assert len({p.name for p in points}) == 9


def test_sweep_values_with_commas_inside_brackets():
    key, values = parse_sweep_arg("data.shape=[32,32,32],[16,16,16]")
    assert key == "data.shape" and values == ["[32,32,32]", "[16,16,16]"]
    assert expand_grid([(key, values)])[0].name == "shape=32_32_32"


def test_sweep_same_last_key_uses_full_key():
    points = expand_grid([parse_sweep_arg("train.lr=1,2"), parse_sweep_arg("model.lr=3,4")])
    assert points[0].name == "train.lr=1,model.lr=3"


@pytest.mark.parametrize("text", ["train.lr", "train.lr=", "train.lr=1e-3,,2", "train.lr=1,1", "bad key=1,2"])
def test_sweep_arg_errors_are_one_line(text):
    with pytest.raises(ConfigError) as err:
        parse_sweep_arg(text)
    assert "\n" not in str(err.value)


def test_sweep_key_twice_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        expand_grid([parse_sweep_arg("train.lr=1,2"), parse_sweep_arg("train.lr=3")])


def test_sweep_file(tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text("train.lr: [1.0e-3, 3.0e-4]\ntrain.seed: [0, 1]\ntrain.deterministic: true\n")
    points = expand_grid(load_sweep_file(f))
    assert [p.overrides for p in points][:2] == [
        ("train.lr=0.001", "train.seed=0", "train.deterministic=true"),
        ("train.lr=0.001", "train.seed=1", "train.deterministic=true"),
    ]
    for p in points:  # every point is a valid config
        load_config("cnn_demo", list(p.overrides))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="maps keys to value lists"):
        load_sweep_file(bad)


def test_dry_run_three_by_three_is_one_array_with_parallelism():
    out = subprocess.run(
        [sys.executable, "-m", "brainage_hpc.launch", "--config", "cnn_hcp", "--nodes", "2", "--gpus-per-node", "4",
         "--sweep", "train.lr=1e-3,3e-4,1e-4",
         "--sweep", "train.seed=0,1,2", "--max-parallel", "3", "--qos", "high", "--mem", "64G", "--constraint", "a100",
         "--exclude", "gpu[03-04]", "--mail-type", "END,FAIL", "--mail-user", "me@example.org", "--run-dir", "/tmp/sweepx",
         "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    s = out.stdout
    assert s.count("\n  [") == 9 and "[8] lr=1e-4,seed=2: train.lr=1e-4 train.seed=2" in s
    for line in ("#SBATCH --array=0-8%3", "#SBATCH --qos=high", "#SBATCH --mem=64GB", "#SBATCH --constraint=a100",
                 "#SBATCH --exclude='gpu[03-04]'", "#SBATCH --mail-type=END,FAIL", "#SBATCH --mail-user=me@example.org",
                 "#SBATCH --requeue", "#SBATCH --signal=USR1@120", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4"):
        assert line in s, line


def test_dry_run_single_run_has_no_array(tmp_path):
    cfg = load_config("cnn_demo", ["launch.array_parallelism=2", "train.dist_timeout_s=30"])
    text = dry_run_script(cfg, tmp_path / "submitit" / "%j")
    assert "--array" not in text and "#SBATCH --requeue" in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--wait=60" in srun  # a hung rank: the others end 30 s after the 30 s process-group timeout


def test_mem_parsing():
    assert parse_mem_gb("64G") == 64.0 and parse_mem_gb("64GB") == 64.0
    assert parse_mem_gb("512M") == 0.5 and parse_mem_gb("1T") == 1024.0 and parse_mem_gb("2048") == 2.0
    for bad in ("", "-1G", "lots", "0"):
        with pytest.raises(ConfigError):
            parse_mem_gb(bad)


def test_time_limit_warning():
    assert time_limit_warning(load_config("cnn_demo", ["launch.time_min=30"]).launch) is None
    text = time_limit_warning(load_config("cnn_demo", ["launch.time_min=2"]).launch)
    assert text and "--time 2 min leaves 0 s" in text
    assert time_limit_warning(load_config("cnn_demo", ["launch.time_min=2", "launch.signal_delay_s=50"]).launch) is None


def test_launch_warns_when_time_is_shorter_than_signal_lead(tmp_path):
    out = subprocess.run([sys.executable, "-m", "brainage_hpc.launch", "--config", "cvae_demo", "--time", "2",
                          "--run-dir", str(tmp_path / "r"), "--dry-run"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "launch: warning: --time 2 min leaves 0 s before the checkpoint signal" in out.stderr
    assert "#SBATCH --time=2" in out.stdout


def test_launch_bad_sweep_value_fails_before_submitting(tmp_path):
    out = subprocess.run([sys.executable, "-m", "brainage_hpc.launch", "--config", "cnn_demo", "--sweep", "train.lr=1e-3,fast",
                          "--run-dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and out.stderr.startswith("launch: error:") and "train.lr" in out.stderr, out.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("sweep", [False, True])
def test_launch_unusable_run_dir_is_one_line(tmp_path, sweep):
    (tmp_path / "file").write_text("x")
    cmd = [sys.executable, "-m", "brainage_hpc.launch", "--config", "cnn_demo", "--run-dir", str(tmp_path / "file" / "r")]
    out = subprocess.run(cmd + (["--sweep", "train.seed=0,1"] if sweep else []), capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("launch: error:") and "is not a folder" in out.stderr and "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- run status / requeue guard


def test_run_status_reads_metrics_and_tolerates_a_torn_line(tmp_path):
    run = tmp_path / "r"
    _write_run(run, [0.9, 0.5, 0.7], total=6, outcome="completed", ckpts=(4, 6))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # being written
    s = run_status(run)
    assert (s.status, s.step, s.total, s.best, s.best_step, s.checkpoint_step) == ("finished", 6, 6, 0.5, 4, 6)
    assert s.progress_text() == "step 6/6"
    assert len(read_metrics(run)) == 8
    assert run_status(tmp_path / "missing").status == "not started"


def test_checkpointed_step_counts_deepspeed_only_when_complete(tmp_path):
    (tmp_path / "ds" / "step00000009").mkdir(parents=True)
    (tmp_path / "ds" / "step00000005").mkdir()
    (tmp_path / "ds" / "step00000005" / ".complete").touch()
    (tmp_path / ".ckpt-step00000012.pt.abc.tmp").touch()
    assert checkpointed_step(tmp_path) == 5


def test_requeue_guard_stops_after_stalled_restarts(tmp_path):
    run = tmp_path / "run"
    requeue.record_start(run, restart_count=0)
    (run / "ckpt-step00000004.pt").touch()
    assert requeue.decide_requeue(run, max_stalled=1).requeue  # progress: 0 -> 4
    requeue.record_start(run, restart_count=1)
    first = requeue.decide_requeue(run, max_stalled=1)
    assert first.requeue and "1 of 1" in first.message  # no new checkpoint: stalled once
    requeue.record_start(run, restart_count=2)
    second = requeue.decide_requeue(run, max_stalled=1)
    assert not second.requeue and "2 restarts in a row" in second.message and "step 4" in second.message
    state = json.loads((run / requeue.STATE_FILE).read_text())
    assert state["message"] == second.message
    requeue.record_start(run, restart_count=0)  # a resubmission starts counting afresh
    assert requeue.decide_requeue(run, max_stalled=1).requeue


def test_requeue_guard_survives_a_damaged_state_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / requeue.STATE_FILE).write_text("{not json")
    assert requeue.decide_requeue(run, max_stalled=0).requeue is False  # counted afresh, stalled once > 0
    assert json.loads((run / requeue.STATE_FILE).read_text())["stalled"] == 1


def test_train_job_checkpoint_refuses_stalled_requeue(tmp_path, monkeypatch):
    from brainage_hpc.config import config_to_dict
    from brainage_hpc.launch import ERROR_FILE, TrainJob

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = config_to_dict(load_config("cnn_demo", ["launch.max_stalled_requeues=1"]))
    job = TrainJob(cfg, str(tmp_path / "run"))
    requeue.record_start(tmp_path / "run", restart_count=0)
    assert job.checkpoint() is not None  # first stall allowed
    requeue.record_start(tmp_path / "run", restart_count=1)
    assert job.checkpoint() is None
    assert "not requeueing" in (tmp_path / "run" / ERROR_FILE).read_text()


def test_requeue_cli(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "brainage_hpc.launching.requeue"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SLURM_RESTART_COUNT": "0"}
    assert subprocess.run([*cmd, "start", str(run)], env=env, capture_output=True, timeout=60).returncode == 0
    out = subprocess.run([*cmd, "check", str(run), "--max-stalled", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not requeueing" in out.stdout


# ----------------------------------------------------------------------------- summary / noise


def test_sweep_summary_sorted_with_failed_and_unstarted(tmp_path):
    from brainage_hpc.launching.sweep import SweepPoint

    sweep = tmp_path / "sweep"
    points = [SweepPoint(i, f"lr={lr}", (f"train.lr={lr}",)) for i, lr in enumerate(["a", "b", "c", "d", "e"])]
    sweep.mkdir()
    write_sweep(sweep, points, [], "cnn_demo", "77")
    _write_run(sweep / "lr=a", [0.8, 0.6], total=4, outcome="completed")
    _write_run(sweep / "lr=b", [0.4, 0.3], total=4, outcome="completed")
    _write_run(sweep / "lr=c", [0.5], total=4, outcome=None)  # preempted, not back yet
    _write_run(sweep / "lr=d", [], total=4, outcome=None)
    (sweep / "lr=d" / "launch_error.txt").write_text("RuntimeError: boom\n")
    files = write_summary(sweep)
    rows = [r.as_dict for r in files.rows]
    assert [r["run"] for r in rows] == ["lr=b", "lr=c", "lr=a", "lr=e", "lr=d"]
    assert [r["status"] for r in rows] == ["finished", "unfinished", "finished", "not started", "failed"]
    assert rows[0]["best"] == "0.3" and rows[0]["overrides"] == "train.lr=b" and rows[-1]["error"] == "RuntimeError: boom"
    assert files.csv.read_text().splitlines()[0].startswith("run,overrides,metric,best")
    assert "| lr=b | train.lr=b | 0.3 | 4 | 4/4 | finished |" in files.markdown.read_text()


def test_sweep_summary_command(tmp_path):
    from brainage_hpc.cli import main

    _write_run(tmp_path / "s" / "one", [0.2], total=2, outcome="completed")
    assert main(["sweep-summary", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "sweep_summary.csv").exists()
    assert main(["sweep-summary", str(tmp_path / "nothing")]) == 2  # one-line error, no traceback
    (tmp_path / "file").write_text("x")
    assert main(["sweep-summary", str(tmp_path / "s"), "--out", str(tmp_path / "file")]) == 2


def test_sacct_warnings_become_debug(caplog):
    quiet_sacct_warnings()
    quiet_sacct_warnings()  # idempotent
    log = logging.getLogger("submitit")
    assert sum(type(f).__name__ == "_SacctNoise" for f in log.filters) == 1
    with caplog.at_level(logging.INFO, logger="submitit"):
        log.warning("Call #3 - Bypassing sacct error Command 'sacct' returned non-zero exit status 1.")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
