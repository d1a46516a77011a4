"""Trainer contracts other parts rely on: hparams for run comparison (19.2), DDP without FutureWarning (19.5),
and a stop request seen by one rank only still stops every rank at the same step (contract 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brainage_hpc.engine.distributed import free_port
from tests.conftest import train_overrides
from tests.reliability.engine_helpers import env, reached_step, records

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_19_2_hparams_name_world_size_epochs_precision_backend_and_monitor(tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from brainage_hpc.config import load_config
    from brainage_hpc.engine.run import train_main

    run = tmp_path / "run"
    cfg = load_config("cnn_demo", train_overrides(tiny_shards, "cnn3d", "train.backend=single", "train.epochs=1",
                                                  "train.monitor=val/mae"))
    assert train_main(cfg, run) == 0
    acc = EventAccumulator(str(run / "tb" / "hparams"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hp = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    assert hp["world_size"] == 1 and hp["epochs"] == 1 and hp["precision"] == "bf16-mixed" and hp["backend"] == "single"
    assert hp["monitor"] == "val/mae (min)"
    assert "hparam/val/mae" in acc.Tags()["scalars"]


def test_contract1_usr1_on_one_rank_stops_both_at_one_step_without_future_warning(tiny_shards, tmp_path):
    import psutil

    run = tmp_path / "run"
    ov = train_overrides(tiny_shards, "cnn3d", "train.backend=ddp", "train.precision=32", "train.max_steps=40",
                         "train.epochs=100", "train.ckpt_every_steps=0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "brainage_hpc.cli", "train", "--config", "cnn_demo", "--run-dir", str(run), *ov]
    proc = subprocess.Popen(cmd, env=env(BRAINAGE_TEST_STEP_SLEEP_S="0.3"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    t0 = time.time()
    while not reached_step(run, 2):
        assert proc.poll() is None and time.time() - t0 < 240, "run never reached step 2"
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    rank1 = [p for p in workers if "LOCAL_RANK" in p.environ() and p.environ()["LOCAL_RANK"] == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0].pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert "FutureWarning" not in err, err[-3000:]
    assert proc.returncode == 1 and "exitcode  : 3" in err and "exitcode  : 1 " not in err, err[-3000:]
    preempt = [r for r in records(run) if r.get("event") == "preempt"]
    assert len(preempt) == 1 and preempt[0]["signal"] == "SIGUSR1"
    import torch

    assert torch.load(run / "last.pt", weights_only=True)["step"] == preempt[0]["step"]
