"""Assemble a training run from a RunConfig: env, data, model, optimizer, backend, trainer.

``train_main`` is shared by ``brainage train`` (single process, torchrun,
srun) and the submitit job in ``brainage_hpc.launch``. Before anything is
written into the run folder, it checks that the folder can be written and rank 0
takes the folder's lock (one run per folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_hpc.config import ConfigError, RunConfig, TrainConfig
from brainage_hpc.engine.backends import build_backend
from brainage_hpc.engine.checkpoint import git_sha, remove_leftovers
from brainage_hpc.engine.distributed import DistEnv, discover_env, init_distributed, select_device
from brainage_hpc.engine.logging import RunLogger
from brainage_hpc.engine.runlock import RunFolderBusy, RunLock
from brainage_hpc.engine.schedule import LRPlan, make_scheduler
from brainage_hpc.engine.signals import PREEMPT_EXIT_CODE, stop_exit_code
from brainage_hpc.engine.syncs import host_values
from brainage_hpc.engine.trainer import Trainer
from brainage_hpc.outputs import prepare_output_dir

__all__ = [
    "train_main", "build_trainer", "data_identity", "make_optimizer", "make_scheduler", "seed_everything",
    "EXIT_CODES", "PREEMPT_EXIT_CODE", "stop_exit_code",
]

log = logging.getLogger(__name__)
# Exit codes of outcomes that do not depend on a signal ("preempted"/"stopped": see stop_exit_code).
EXIT_CODES = {"completed": 0, "early_stopped": 0, "preempted": PREEMPT_EXIT_CODE, "diverged": 1}


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Optimizer named by ``train.optimizer``; no weight decay on norms and biases.

    The torch backends get the fused implementation: one kernel per step, and it
    skips a non-finite update on the device (``found_inf``) without a host sync.
    DeepSpeed wraps the optimizer itself and keeps the plain one.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.backend != "deepspeed" or None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, fused=fused)


def data_identity(manifest: Any, splits: list[str]) -> dict[str, Any]:
    """What makes two shard sets the same data for a resume: shape, preprocessing, split membership."""
    members = {name: sorted(manifest.splits.get(name, [])) for name in splits if name}
    return {
        "shape": list(manifest.shape),
        "preprocess_hash": manifest.preprocess_hash,
        "fingerprint": manifest.extra.get("fingerprint"),
        "splits_sha256": hashlib.sha256(json.dumps(members, sort_keys=True).encode()).hexdigest(),
    }


def _setup_logging(run_dir: Path, env: DistEnv) -> logging.Handler | None:
    """Rank-tagged log lines on stderr; rank 0 also into ``train.log`` (the handler is returned)."""
    root = logging.getLogger()
    fmt = logging.Formatter(f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(fmt)
        root.addHandler(h)
    else:
        for h in root.handlers:
            h.setFormatter(fmt)
    root.setLevel(logging.INFO)
    fh = None
    if env.rank == 0:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return fh


def build_trainer(cfg: RunConfig, run_dir: str | Path, env: DistEnv | None = None) -> Trainer:
    """Everything up to (not including) ``fit``; the process group must exist already."""
    from brainage_hpc.data.loader import build_loader
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.models.registry import build_model

    env = env or discover_env()
    device = select_device(env)
    run_dir = Path(run_dir)
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: set it to the folder written by `brainage preprocess` (data.shards=DIR)")
    manifest = load_manifest(cfg.data.shards)
    shape = list(manifest.shape)
    if list(cfg.data.shape) != shape:
        log.info("data.shape %s differs from the shards' %s: using the shards' shape", cfg.data.shape, shape)
    world, accum = env.world_size, cfg.train.grad_accum
    if cfg.data.batch_size % (world * accum) != 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by world_size*grad_accum={world}*{accum}; "
            f"use a multiple of {world * accum}"
        )
    micro = cfg.data.batch_size // (world * accum)
    train_data = build_loader(cfg, cfg.data.train_split, train=True, micro_batch=micro, rank=env.rank, world_size=world, device=device)
    val_data = None
    if cfg.data.val_split and manifest.splits.get(cfg.data.val_split):
        val_data = build_loader(cfg, cfg.data.val_split, train=False, micro_batch=micro, rank=env.rank, world_size=world, device=device)
    if len(train_data) < accum:
        raise ConfigError(f"split '{cfg.data.train_split}' gives {len(train_data)} batches per rank, fewer than grad_accum={accum}")
    seed_everything(cfg.train.seed, cfg.train.deterministic)  # same initial weights on every rank
    model = build_model(cfg.model, tuple(shape)).to(device)
    seed_everything(cfg.train.seed + 1000 * env.rank, cfg.train.deterministic)  # per-rank dropout streams
    optimizer = make_optimizer(cfg.train, model)
    steps = cfg.train.max_steps or cfg.train.epochs * max(len(train_data) // accum, 1)
    scheduler = make_scheduler(cfg.train, optimizer, steps, LRPlan(cfg.train, steps))
    backend = build_backend(env, device, cfg.train, micro)
    model, optimizer = backend.setup(model, optimizer, scheduler)
    logger = RunLogger(run_dir, enabled=env.rank == 0, progress=cfg.train.progress)
    meta: dict[str, Any] = {
        "git_sha": git_sha(),
        "shape": shape,
        "preprocess": manifest.preprocess,
        "affine": [list(map(float, row)) for row in manifest.affine],
        "fingerprint": manifest.extra.get("fingerprint"),  # contract 4: preprocessing fingerprint of the shards
        "data_identity": data_identity(manifest, [cfg.data.train_split, cfg.data.val_split]),
    }
    return Trainer(cfg, run_dir, backend, model, optimizer, train_data, val_data, logger, meta)


def _lock_run_dir(run_dir: Path, env: DistEnv, device: torch.device) -> RunLock | None:
    """Rank 0 takes the folder's lock; every rank learns whether it got it (one collective)."""
    lock, problem = None, None
    if env.rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunFolderBusy as exc:
            lock, problem = None, exc
    if env.is_distributed and torch.distributed.is_initialized():
        flag = torch.tensor([0.0 if env.rank == 0 and problem is not None else 1.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if host_values(flag)[0] < 1 and problem is None:
            problem = RunFolderBusy(f"run folder {run_dir} is in use by another training (rank 0 could not lock it)")
    if problem is not None:
        raise problem
    return lock


def train_main(cfg: RunConfig, run_dir: str | Path, resume: str = "auto", env: DistEnv | None = None) -> int:
    """Train and return an exit code (contract with the sbatch scripts and the launcher).

    0 completed or early-stopped; 1 diverged; 3 checkpointed after SIGUSR1 (requeue
    wanted); 128 + signum (143 SIGTERM, 130 SIGINT) checkpointed after a stop request.

    Raises:
        OutputError: the run folder cannot be written, or another run holds its lock.
        ConfigError: a refused resume (``ResumeError``) or a bad config value.
    """
    env = env or discover_env()
    run_dir = prepare_output_dir(run_dir, "run folder")
    device = select_device(env)
    init_distributed(env, device, timeout_s=cfg.train.dist_timeout_s)
    lock = _lock_run_dir(run_dir, env, device)
    file_log = None
    try:
        file_log = _setup_logging(run_dir, env)
        if env.rank == 0:
            remove_leftovers(run_dir)  # temp files of writes a kill -9 interrupted (we hold the lock)
        trainer = build_trainer(cfg, run_dir, env)
        try:
            outcome = trainer.fit(resume)
        finally:
            trainer.logger.close()
        log.info("training %s at step %d", outcome, trainer.state.step)
        return trainer.exit_code(outcome)
    finally:
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
            file_log.close()
        if lock is not None:
            lock.release()
