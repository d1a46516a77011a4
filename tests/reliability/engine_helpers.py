"""Helpers of the engine fault tests: run ``brainage train`` in-process or as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import train_overrides

REPO = Path(__file__).resolve().parents[2]


def ov(shards: Path, *extra: str) -> list[str]:
    """Fast deterministic single-process CNN run, checkpoint every 2 steps."""
    return train_overrides(shards, "cnn3d", "train.backend=single", "train.precision=32", "train.epochs=100",
                           "train.deterministic=true", "train.ckpt_every_steps=2", *extra)


def train_cli(run_dir: Path, overrides: list[str], resume: str = "auto", capsys=None) -> tuple[int, str]:
    """``brainage train`` in this process; returns (exit code, stderr when ``capsys`` is given)."""
    from brainage_hpc.cli import main

    if capsys is not None:
        capsys.readouterr()
    code = main(["train", "--config", "cnn_demo", "--run-dir", str(run_dir), "--resume", resume, *overrides])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    e.update({"OMP_NUM_THREADS": "1", "BRAINAGE_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}, **extra)
    return e


def train_cmd(run_dir: Path, overrides: list[str], resume: str = "auto") -> list[str]:
    return [sys.executable, "-m", "brainage_hpc.cli", "train", "--config", "cnn_demo", "--run-dir", str(run_dir),
            "--resume", resume, *overrides]


def run_proc(run_dir: Path, overrides: list[str], resume: str = "auto", timeout: int = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(run_dir, overrides, resume), env=env(**extra), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def start_proc(run_dir: Path, overrides: list[str], resume: str = "auto", **extra: str) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(run_dir, overrides, resume), env=env(**extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for(pred, proc: subprocess.Popen | None = None, timeout: float = 240, what: str = "condition") -> None:
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def reached_step(run_dir: Path, step: int) -> bool:
    return any(r.get("step", 0) >= step and "train/loss" in r for r in records(run_dir))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def snapshot(run_dir: Path, names: tuple[str, ...] = ("ckpt-step", "best.pt", "last.pt", "config.yaml", "ds")) -> dict[str, tuple[int, int, bytes]]:
    """(size, mtime_ns, first bytes) of every checkpoint-ish file, to prove nothing changed."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_file() and rel.startswith(names):
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, p.read_bytes()[:4096])
    return out


def one_line_error(stderr: str) -> list[str]:
    """The non-log lines of stderr (what a user sees as the error); asserts no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("brainage ")]
