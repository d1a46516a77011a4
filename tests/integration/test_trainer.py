"""Real training runs on CPU: single process in-process, 2-process torchrun (gloo) for DDP and DeepSpeed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brainage_hpc.engine.distributed import free_port
from tests.conftest import train_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    env.update({"OMP_NUM_THREADS": "1", "BRAINAGE_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}, **extra)
    return env


def _train_cmd(nproc: int, run_dir: Path, overrides: list[str], resume: str = "auto") -> list[str]:
    head = [sys.executable, "-m", "brainage_hpc.cli"]
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "brainage_hpc.cli"]
    return [*head, "train", "--config", "cnn_demo", "--run-dir", str(run_dir), "--resume", resume, *overrides]


def _run(cmd: list[str], timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in _records(run_dir) if "train/loss" in r]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from brainage_hpc.engine.checkpoint import load_inference_bundle

    return load_inference_bundle(run_dir)["state_dict"]


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
@pytest.mark.parametrize("model", ["cnn3d", "sfcn", "cvae"])
def test_two_process_training_bf16(tiny_shards, tmp_path, model, backend):
    run_dir = tmp_path / f"{model}-{backend}"
    ov = train_overrides(tiny_shards, model, f"train.backend={backend}", "train.precision=bf16-mixed", "train.epochs=5", "train.zero_stage=2")
    out = _run(_train_cmd(2, run_dir, ov))
    assert out.returncode == 0, out.stderr[-3000:]
    losses = _losses(run_dir)
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, (first, last)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "perf/volumes_per_s", "perf/data_wait_fraction", "val/loss", "val/mae"} <= tags, tags
    assert (run_dir / "config.yaml").is_file()
    weights = _weights(run_dir)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def _signal_workers_when(run_dir: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> None:
    """Send SIGUSR1 to the training processes (not the torchrun agent) once step >= min_step."""
    import psutil

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the signal: {proc.stderr.read()[-3000:]}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= min_step and "train/loss" in r for r in _records(run_dir)):
            parent = psutil.Process(proc.pid)
            kids = parent.children(recursive=True)
            targets = kids if kids else [parent]
            for p in targets:
                os.kill(p.pid, signal.SIGUSR1)
            return
        time.sleep(0.05)
    raise AssertionError("training never reached the signalling step")


@pytest.mark.parametrize("backend, nproc", [("ddp", 2), ("deepspeed", 2), ("single", 1)])
def test_exact_resume_after_sigusr1(tiny_shards, tmp_path, backend, nproc):
    """N steps straight == N/2, SIGUSR1, exit 3, --resume auto, rest: identical weights."""
    steps = 16
    common = train_overrides(tiny_shards, "cnn3d", f"train.backend={backend}", f"train.max_steps={steps}",
                             "train.deterministic=true", "train.zero_stage=2", "train.epochs=100")
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = _run(_train_cmd(nproc, straight, common))
    assert out.returncode == 0, out.stderr[-3000:]

    proc = subprocess.Popen(_train_cmd(nproc, split, common), env=_env(BRAINAGE_TEST_STEP_SLEEP_S="0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    _signal_workers_when(split, proc, min_step=steps // 2 - 3)
    proc.wait(timeout=120)
    err = proc.stderr.read()
    if nproc == 1:
        assert proc.returncode == 3, err[-3000:]
    else:  # torchrun itself exits 1 when a worker exits non-zero; the workers' code is in its report
        assert proc.returncode == 1 and "exitcode  : 3" in err and "exitcode  : 1 " not in err, err[-3000:]
    preempt = [r for r in _records(split) if r.get("event") == "preempt"]
    assert len(preempt) == 1 and 0 < preempt[0]["step"] < steps
    saved_step = preempt[0]["step"]

    out = _run(_train_cmd(nproc, split, common))
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = [r for r in _records(split) if r.get("event") == "resume"]
    assert resumed and resumed[-1]["step"] == saved_step
    assert [r for r in _records(split) if r.get("event") == "end"][-1]["step"] == steps

    a, b = _weights(straight), _weights(split)
    assert a.keys() == b.keys()
    for k in a:
        if backend == "deepspeed":
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_kill9_during_checkpoint_write_keeps_previous(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = train_overrides(tiny_shards, "cnn3d", "train.backend=single", "train.epochs=100")
    out = _run(_train_cmd(1, run_dir, [*common, "train.max_steps=4"]))
    assert out.returncode == 0, out.stderr[-3000:]
    before = torch.load(run_dir / "last.pt", weights_only=True)
    assert before["step"] == 4

    proc = subprocess.Popen(_train_cmd(1, run_dir, [*common, "train.max_steps=8"]), env=_env(BRAINAGE_CKPT_WRITE_HOLD_S="60"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    t0 = time.time()
    while not list(run_dir.glob("*.writing")):
        assert proc.poll() is None and time.time() - t0 < 120, "no checkpoint write started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(run_dir.glob(".*.tmp")), "the half-written temp file should be there"
    again = torch.load(run_dir / "last.pt", weights_only=True)
    assert again["step"] == 4 and all(torch.equal(again["model"][k], before["model"][k]) for k in before["model"])

    out = _run(_train_cmd(1, run_dir, [*common, "train.max_steps=8"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 8
    assert [r for r in _records(run_dir) if r.get("event") == "resume"][-1]["step"] == 4


def test_corrupt_newest_checkpoint_is_skipped(tiny_shards, tmp_path, caplog):
    from brainage_hpc.config import load_config
    from brainage_hpc.engine.run import train_main

    run_dir = tmp_path / "run"
    ov = train_overrides(tiny_shards, "cnn3d", "train.backend=single", "train.epochs=100", "train.ckpt_every_steps=2")
    assert train_main(load_config("cnn_demo", [*ov, "train.max_steps=6"]), run_dir) == 0
    newest = sorted(run_dir.glob("ckpt-step*.pt"))[-1]
    assert newest.name == "ckpt-step00000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated: unreadable
    caplog.set_level("WARNING")
    assert train_main(load_config("cnn_demo", [*ov, "train.max_steps=8"]), run_dir) == 0
    assert "skipping unreadable checkpoint" in caplog.text and "ckpt-step00000006.pt" in caplog.text
    resumed = [r for r in _records(run_dir) if r.get("event") == "resume"]
    assert resumed[-1]["step"] == 4
