"""Trainer overhead: our ``Trainer`` vs a bare PyTorch loop on the same model, optimizer and batches.

``python -m benchmarks.trainer_overhead [--quick] [--out bench_out/trainer_overhead.json]``

Both sides train a model built by ``build_model`` from the same config (the
``cnn_demo`` seed CNN at 48x56x48 by default), from the same initial weights,
with the same ``make_optimizer`` optimizer, on the same batches held in memory
as tensors (no loader, no validation, no checkpoints). The bare loop is::

    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        optimizer.step()

Ours is ``Trainer.train_epoch`` on the ``single`` backend, fp32, with
everything it always does: the non-finite-loss guard, the gradient-norm
computation, the LR scheduler, the on-device loss window, the stop-flag check
and the ``metrics.jsonl`` + TensorBoard lines every ``log_every_steps``.
Denormals are flushed to zero for both sides. The progress bar is off. Warm-up: one epoch of the bare loop, and trainer epochs until its first log
line is written; then ``--repeats``
epochs of each, interleaved (ours, bare, ours, bare...) so drifting machine load
hits both alike, and the median volumes/s of each is compared.
Target (DESIGN.md section 7): ours at most 5 % slower.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BENCH_OUT, finish, make_ratio, make_result, median, set_threads, sync

__all__ = ["main", "InMemoryData", "bare_epoch", "trainer_epoch"]

TARGET_SLOWDOWN = 0.05


class InMemoryData:
    """The ``train_data`` object the Trainer expects, over batches already in memory."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.loader = batches
        self.sampler = None
        self.device_augment = None

    def __len__(self) -> int:
        return len(self.loader)


def make_batches(n: int, batch: int, shape: tuple[int, int, int], device: torch.device, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` random batches: image (B, 1, D, H, W) float32, age (B,) years, label/age_bin (B,) int64, sex (B,)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        age = 22 + 14 * torch.rand(batch, generator=g)
        out.append({
            "image": torch.randn(batch, 1, *shape, generator=g).to(device),
            "age": age.to(device),
            "age_bin": ((age - 22) // 4).long().clamp(0, 3).to(device),
            "label": ((age - 22) // 4).long().clamp(0, 3).to(device),
            "sex": (torch.rand(batch, generator=g) > 0.5).float().to(device),
            "subject_id": [f"s{k}_{i}" for i in range(batch)],
        })
    return out


def bare_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, Any]],
               device: torch.device) -> float:
    """One pass of the bare loop; returns volumes/s."""
    model.train()
    sync(device)
    t0 = time.perf_counter()
    n = 0
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        n += batch["image"].shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def trainer_epoch(trainer: Any, n_volumes: int) -> float:
    """One ``Trainer.train_epoch``; returns volumes/s."""
    sync(trainer.backend.device)
    t0 = time.perf_counter()
    outcome = trainer.train_epoch()
    sync(trainer.backend.device)
    if outcome != "completed":
        raise RuntimeError(f"train_epoch ended with {outcome!r}")
    return n_volumes / (time.perf_counter() - t0)


def _build(args: argparse.Namespace, run_dir: Path, device: torch.device) -> tuple[Any, torch.nn.Module, Any, Any]:
    from brainage_hpc.config import load_config
    from brainage_hpc.engine.backends import build_backend
    from brainage_hpc.engine.distributed import DistEnv
    from brainage_hpc.engine.logging import RunLogger
    from brainage_hpc.engine.run import make_optimizer, make_scheduler
    from brainage_hpc.engine.trainer import Trainer
    from brainage_hpc.models.registry import build_model

    cfg = load_config(args.config, [
        f"data.shape={list(args.shape)}", f"data.batch_size={args.batch}", "data.augment.enabled=false",
        "train.backend=single", "train.precision=32", "train.grad_accum=1", "train.grad_clip=0",
        "train.schedule=constant", "train.warmup_steps=0", "train.max_steps=0", f"train.epochs={10**6}",
        "train.ckpt_every_steps=0", "train.progress=false", f"train.log_every_steps={args.log_every}",
        *args.override,
    ])
    torch.manual_seed(0)
    model = build_model(cfg.model, tuple(args.shape)).to(device)
    bare_model = copy.deepcopy(model)  # same initial weights
    env = DistEnv()
    backend = build_backend(env, device, cfg.train, args.batch)
    optimizer = make_optimizer(cfg.train, model)
    scheduler = make_scheduler(cfg.train, optimizer, 10**9)
    model, optimizer = backend.setup(model, optimizer, scheduler)
    logger = RunLogger(run_dir, enabled=True, progress=False)
    data = InMemoryData(make_batches(args.steps, args.batch, tuple(args.shape), device))
    trainer = Trainer(cfg, run_dir, backend, model, optimizer, data, None, logger, {})
    bare_opt = make_optimizer(cfg.train, bare_model)
    return trainer, bare_model, bare_opt, cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps and repeats (a smoke run, not a measurement)")
    p.add_argument("--config", default="cnn_demo", help="config whose model is benchmarked (default cnn_demo)")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 56, 48], metavar=("D", "H", "W"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default 30; quick 5)")
    p.add_argument("--repeats", type=int, default=None, help="timed epochs per side (default 7; quick 2)")
    p.add_argument("--log-every", type=int, default=None, help="trainer log interval in steps (default 10; quick 5)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides, e.g. model.params.width=16")
    p.add_argument("--out", default=None, help="JSON result (default bench_out/trainer_overhead.json)")
    args = p.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 30)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.log_every = args.log_every or (5 if args.quick else 10)
    out = args.out or str(BENCH_OUT / ("quick" if args.quick else "") / "trainer_overhead.json")
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    # Denormal floats slow CPU arithmetic by an amount that depends on the weights, so two
    # copies of a model that drift apart ran up to 15 % apart here for that reason alone;
    # flushing them to zero makes both sides measure the loop, not the numbers.
    torch.set_flush_denormal(True)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        trainer, bare_model, bare_opt, cfg = _build(args, Path(tmp), device)
        batches = trainer.train_data.loader
        n_vol = args.steps * args.batch
        while True:  # warm-up until the first log line is out (allocator, autograd graph, TensorBoard writer)
            trainer_epoch(trainer, n_vol)
            if trainer.state.step >= args.log_every:
                break
        bare_epoch(bare_model, bare_opt, batches, device)
        ours, bare = [], []
        for _ in range(args.repeats):
            ours.append(trainer_epoch(trainer, n_vol))
            bare.append(bare_epoch(bare_model, bare_opt, batches, device))
        trainer.logger.close()

    m_ours, m_bare = median(ours), median(bare)
    ratio_value = m_ours / m_bare
    slower = 1.0 - ratio_value
    rows = [
        ["bare PyTorch loop", f"{m_bare:.2f}", f"{min(bare):.2f}–{max(bare):.2f}", "1.000"],
        ["brainage Trainer (single, fp32)", f"{m_ours:.2f}", f"{min(ours):.2f}–{max(ours):.2f}", f"{ratio_value:.3f}"],
    ]
    ratio = make_ratio(
        "Trainer / bare volumes/s", ratio_value, 1.0 - TARGET_SLOWDOWN, ">=",
        text=(f"Trainer / bare = {ratio_value:.3f}, i.e. "
              + (f"{100 * slower:.1f} % slower" if slower > 0 else f"{-100 * slower:.1f} % faster (within run-to-run spread)")
              + f" (target ≤ {100 * TARGET_SLOWDOWN:.0f} % slower)"),
    )
    model = f"{cfg.model.name} {cfg.model.params}"
    result = make_result(
        "trainer_overhead", "Trainer overhead vs a bare PyTorch loop", argv, quick=args.quick,
        config={"config": args.config, "model": model, "shape": args.shape, "batch": args.batch, "steps": args.steps,
                "repeats": args.repeats, "threads": args.threads, "device": args.device, "log_every": args.log_every},
        headers=["loop", "volumes/s (median)", "range", "vs bare"], rows=rows, ratio=ratio,
        notes=[f"{model} at {'x'.join(map(str, args.shape))}, batch {args.batch}, {args.steps} steps per epoch, "
               f"median of {args.repeats} interleaved epochs after warm-up, {args.threads} torch threads, "
               f"{args.device}; data in memory, no validation or checkpoints."],
        volumes_per_s={"trainer": ours, "bare": bare},
    )
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
