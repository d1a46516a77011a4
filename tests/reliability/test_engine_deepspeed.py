"""Issue 14 D1 for DeepSpeed tag folders: a damaged file fails checksums.sha256 and the previous tag is used."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.fault_tools import flip_tensor_bytes
from brainage_hpc.engine.distributed import free_port
from tests.conftest import train_overrides
from tests.reliability.engine_helpers import REPO, env, records

pytestmark = pytest.mark.slow


def _ds_train(shards, run_dir, *extra):
    ov = train_overrides(shards, "cnn3d", "train.backend=deepspeed", "train.precision=32", "train.zero_stage=2",
                         "train.epochs=100", "train.ckpt_every_steps=2", "train.deterministic=true", *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "brainage_hpc.cli", "train", "--config", "cnn_demo", "--run-dir", str(run_dir), *ov]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900, cwd=REPO)


def test_D1_deepspeed_damaged_tag_is_skipped_with_one_warning(tiny_shards, tmp_path):
    run = tmp_path / "run"
    out = _ds_train(tiny_shards, run, "train.max_steps=4")
    assert out.returncode == 0, out.stderr[-3000:]
    tag = run / "ds" / "step00000004"
    assert (tag / "checksums.sha256").is_file() and (tag / ".complete").is_file()
    flip_tensor_bytes(tag / "mp_rank_00_model_states.pt", "exponent")
    out = _ds_train(tiny_shards, run, "train.max_steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if "skipping unreadable checkpoint" in line]
    assert len(warnings) == 1 and "step00000004" in warnings[0] and "SHA-256" in warnings[0], out.stderr[-3000:]
    assert [r["step"] for r in records(run) if r.get("event") == "resume"][-1] == 3
