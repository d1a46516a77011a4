"""Engine pieces on their own: precision, checkpoints, RNG, env discovery, metrics, schedules."""

import math
import random

import numpy as np
import pytest
import torch

from brainage_hpc.config import TrainConfig
from brainage_hpc.engine import checkpoint as ckpt
from brainage_hpc.engine.backends import Precision, build_backend, deepspeed_config
from brainage_hpc.engine.distributed import DistEnv, discover_env
from brainage_hpc.engine.run import make_scheduler
from brainage_hpc.engine.val_metrics import ValAccumulator, confusion_metrics


@pytest.mark.parametrize("mode, dtype, scaler", [("32", None, False), ("bf16-mixed", torch.bfloat16, False), ("16-mixed", torch.float16, True)])
def test_precision(mode, dtype, scaler):
    p = Precision(mode, torch.device("cpu"))
    assert p.dtype == dtype
    assert p.scaler.is_enabled() == scaler
    lin = torch.nn.Linear(4, 4)
    with p.autocast():
        y = lin(torch.randn(2, 4))
    assert y.dtype == (dtype if dtype is torch.bfloat16 else torch.float32) or mode == "16-mixed"


def test_precision_rejects_unknown():
    with pytest.raises(ValueError, match="Valid: 32, bf16-mixed, 16-mixed"):
        Precision("bf16", torch.device("cpu"))


def test_backend_errors():
    with pytest.raises(ValueError, match="cannot run 2 processes"):
        build_backend(DistEnv(world_size=2), torch.device("cpu"), TrainConfig(backend="single"), 2)


def test_deepspeed_config_follows_precision():
    ds = deepspeed_config(TrainConfig(precision="bf16-mixed", zero_stage=2, grad_accum=2, grad_clip=1.0), 4, 2)
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    ds16 = deepspeed_config(TrainConfig(precision="16-mixed", offload_optimizer=True, deepspeed={"zero_optimization": {"stage": 1}}), 1, 1)
    assert ds16["fp16"]["enabled"] and ds16["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": False}}


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        ckpt.atomic_torch_save({"bad": lambda x: x}, path)  # unpicklable
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_rng_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng()
    ckpt.atomic_torch_save({"rng": [state]}, tmp_path / "r.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = torch.load(tmp_path / "r.pt", weights_only=True)["rng"][0]
    ckpt.restore_rng(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_list_prune_and_resume_order(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.atomic_torch_save({"step": step}, ckpt.checkpoint_path(tmp_path, step, "ddp"))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path, "ddp")] == [20, 15, 10, 5]
    best = ckpt.checkpoint_path(tmp_path, 5, "ddp")
    ckpt.prune_checkpoints(tmp_path, "ddp", keep=2, protect={best})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path, "ddp")] == [20, 15, 5]
    assert ckpt.find_resume(tmp_path, "ddp", "none") == []
    assert ckpt.find_resume(tmp_path, "ddp", "auto")[0].name == "ckpt-step00000020.pt"
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ckpt.find_resume(tmp_path, "ddp", str(tmp_path / "nope.pt"))


def test_link_as_is_atomic_hard_link(tmp_path):
    src = ckpt.atomic_torch_save({"x": 1}, tmp_path / "ckpt-step00000001.pt")
    last = ckpt.link_as(src, "last.pt")
    assert last.samefile(src)


def test_discover_env_torchrun(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1"), monkeypatch.setenv("MASTER_PORT", "1234")
    env = discover_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (1, 2, 1, "10.0.0.1", 1234, "torchrun")


def test_discover_env_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77"), monkeypatch.setenv("SLURM_PROCID", "3"), monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "0"), monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid"), monkeypatch.setenv("MASTER_PORT", "2345")
    env = discover_env()
    assert (env.rank, env.world_size, env.master_addr, env.source) == (3, 4, "127.0.0.1", "slurm")


def test_discover_env_single(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    assert discover_env() == DistEnv()


def test_confusion_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    y = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    p = np.array([0, 1, 1, 1, 2, 0, 2, 2])
    cm = torch.zeros(4, 4, dtype=torch.float64)
    for a, b in zip(y, p):
        cm[a, b] += 1
    m = confusion_metrics(cm)
    assert m["f1_micro"] == pytest.approx(f1_score(y, p, average="micro"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))


class _Reduce:
    def all_reduce(self, t, op="sum"):
        return t


def test_val_accumulator_regression():
    acc = ValAccumulator("regress", torch.device("cpu"))
    age = torch.tensor([22.0, 30.0, 35.0, float("nan")])
    pred = torch.tensor([24.0, 29.0, 35.0, 30.0])
    acc.add({"loss": torch.tensor(2.0), "pred_age": pred}, {"image": torch.zeros(4, 1, 2, 2, 2), "age": age})
    m = acc.compute(_Reduce())
    assert m["val/mae"] == pytest.approx(1.0)
    assert m["val/rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert m["val/loss"] == pytest.approx(2.0)
    y, p = age[:3].double(), pred[:3].double()
    assert m["val/r2"] == pytest.approx(1 - ((p - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def test_scheduler_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(TrainConfig(warmup_steps=4, schedule="cosine"), opt, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[-1] < 0.1 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
