"""Assemble a training run from a RunConfig: env, data, model, optimizer, backend, trainer.

``train_main`` is shared by ``brainage train`` (single process, torchrun,
srun) and the submitit job in ``brainage_hpc.launch``.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_hpc.config import ConfigError, RunConfig, TrainConfig, save_config
from brainage_hpc.engine.backends import build_backend
from brainage_hpc.engine.checkpoint import git_sha
from brainage_hpc.engine.distributed import DistEnv, discover_env, init_distributed, select_device
from brainage_hpc.engine.logging import RunLogger
from brainage_hpc.engine.trainer import PREEMPT_EXIT_CODE, Trainer

__all__ = ["train_main", "build_trainer", "make_optimizer", "make_scheduler", "seed_everything", "EXIT_CODES"]

log = logging.getLogger(__name__)
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
    """Optimizer named by ``train.optimizer``; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine / linear decay or constant."""
    warm = max(cfg.warmup_steps, 0)
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
        if cfg.schedule == "cosine":
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return max(1.0 - progress, 0.05)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _setup_logging(run_dir: Path, env: DistEnv) -> None:
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
    if env.rank == 0:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    scheduler = make_scheduler(cfg.train, optimizer, steps)
    backend = build_backend(env, device, cfg.train, micro)
    model, optimizer = backend.setup(model, optimizer, scheduler)
    if env.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir, enabled=env.rank == 0, progress=cfg.train.progress)
    meta: dict[str, Any] = {
        "git_sha": git_sha(),
        "shape": shape,
        "preprocess": manifest.preprocess,
        "affine": [list(map(float, row)) for row in manifest.affine],
        "fingerprint": manifest.extra.get("fingerprint"),  # contract 4: preprocessing that made the shards
    }
    return Trainer(cfg, run_dir, backend, model, optimizer, train_data, val_data, logger, meta)


def train_main(cfg: RunConfig, run_dir: str | Path, resume: str = "auto", env: DistEnv | None = None) -> int:
    """Train and return an exit code: 0 done, PREEMPT_EXIT_CODE (3) preempted, 1 diverged."""
    env = env or discover_env()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir, env)
    device = select_device(env)
    init_distributed(env, device)
    trainer = build_trainer(cfg, run_dir, env)
    try:
        outcome = trainer.fit(resume)
    finally:
        trainer.logger.close()
    log.info("training %s at step %d", outcome, trainer.state.step)
    return EXIT_CODES[outcome]
