"""Trainer overhead: our ``Trainer`` vs a bare PyTorch loop on the same model, optimizer and batches.

``python -m benchmarks.trainer_overhead [--quick] [--pairs 20] [--out benchmarks/results/trainer_overhead.json]``

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

import numpy as np
import torch

from benchmarks.common import finish, machine_info, make_ratio, make_result, median, result_path, set_threads, sync

__all__ = ["main", "InMemoryData", "bare_epoch", "bootstrap_ratio_ci", "describe_ci", "trainer_epoch"]

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


def bootstrap_ratio_ci(ours: list[float], bare: list[float], n_boot: int = 10_000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """Ratio of mean epoch times (ours / bare) and its percentile bootstrap CI, resampling the pairs.

    Args:
        ours: seconds per epoch of the trainer, one per pair.
        bare: seconds per epoch of the bare loop, the same pairs.

    Returns:
        (point estimate, lower, upper).
    """
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(bare, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError("need at least 2 pairs of equal length")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))  # (n_boot, pairs)
    ratios = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(a.mean() / b.mean()), float(lo), float(hi)


def describe_ci(point: float, lo: float, hi: float, target: float) -> str:
    """The sentence a reader may draw from the CI, and nothing more."""
    pct = lambda r: f"{100 * abs(r - 1):.1f} %"  # noqa: E731
    if lo > 1.0:
        verdict = f"slower by {pct(lo)} to {pct(hi)}"
    elif hi < 1.0:
        verdict = f"faster by {pct(hi)} to {pct(lo)}"
    else:
        verdict = f"no difference resolved: between {pct(lo)} faster and {pct(hi)} slower"
    return (f"Trainer / bare epoch time = {point:.3f} (95 % CI {lo:.3f}–{hi:.3f}): {verdict} "
            f"(target: upper bound ≤ {target:.2f})")


def _reset(model: torch.nn.Module, optimizer: Any, init: tuple[dict[str, Any], dict[str, Any]]) -> None:
    model.load_state_dict(init[0])
    optimizer.load_state_dict(copy.deepcopy(init[1]))


def _time_checkpoints(trainer: Any, run_dir: Path, n: int) -> tuple[list[float], float]:
    """ms of ``n`` ``save_checkpoint`` calls (as ``fit`` writes at every epoch end) and the file size in MB."""
    times = []
    for _ in range(n):
        trainer.state.step += 1  # a new step: a new file, then last.pt and pruning, as in a run
        sync(trainer.backend.device)
        t0 = time.perf_counter()
        path = trainer.save_checkpoint()
        times.append(1e3 * (time.perf_counter() - t0))
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return times, size / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps and pairs (a smoke run, not a measurement)")
    p.add_argument("--config", default="cnn_demo", help="config whose model is benchmarked (default cnn_demo)")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 56, 48], metavar=("D", "H", "W"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default 30; quick 3)")
    p.add_argument("--pairs", type=int, default=None, help="paired, interleaved epochs (default 20; quick 3)")
    p.add_argument("--checkpoints", type=int, default=None, help="timed save_checkpoint calls (default 5; quick 2)")
    p.add_argument("--log-every", type=int, default=None, help="trainer log interval in steps (default 10; quick 3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides, e.g. model.params.width=16")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/trainer_overhead.json)")
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 30)
    args.pairs = args.pairs or (3 if args.quick else 20)
    args.checkpoints = args.checkpoints or (2 if args.quick else 5)
    args.log_every = args.log_every or (3 if args.quick else 10)
    out = args.out or str(result_path("trainer_overhead", args.quick))
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    machine = machine_info()
    # Denormal floats slow CPU arithmetic by an amount that depends on the weights, so two
    # copies of a model that drift apart ran up to 15 % apart here for that reason alone;
    # flushing them to zero (and restarting both from the same weights every epoch) makes
    # both sides measure the loop, not the numbers.
    torch.set_flush_denormal(True)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        trainer, bare_model, bare_opt, cfg = _build(args, Path(tmp), device)
        batches = trainer.train_data.loader
        n_vol = args.steps * args.batch
        ours_model = trainer.backend.unwrap(trainer.model)
        init = (copy.deepcopy(bare_model.state_dict()), copy.deepcopy(bare_opt.state_dict()))
        while True:  # warm-up until the first log line is out (allocator, autograd graph, TensorBoard writer)
            trainer_epoch(trainer, n_vol)
            if trainer.state.step >= args.log_every:
                break
        bare_epoch(bare_model, bare_opt, batches, device)
        ours_s, bare_s = [], []
        for k in range(args.pairs):  # ABBA: each side goes first in half of the pairs
            sides = ("ours", "bare") if k % 2 == 0 else ("bare", "ours")
            for side in sides:
                if side == "ours":
                    _reset(ours_model, trainer.optimizer, init)
                    ours_s.append(n_vol / trainer_epoch(trainer, n_vol))
                else:
                    _reset(bare_model, bare_opt, init)
                    bare_s.append(n_vol / bare_epoch(bare_model, bare_opt, batches, device))
        ckpt_ms, ckpt_mb = _time_checkpoints(trainer, Path(tmp), args.checkpoints)
        trainer.logger.close()

    point, lo, hi = bootstrap_ratio_ci(ours_s, bare_s)
    limit = 1.0 + TARGET_SLOWDOWN
    text = describe_ci(point, lo, hi, limit)
    epoch_ms = 1e3 * median(ours_s)
    rows = [
        ["bare PyTorch loop", f"{n_vol / median(bare_s):.2f}", f"{1e3 * median(bare_s):.0f}", "1.000", ""],
        [f"brainage Trainer ({cfg.train.backend}, fp32)", f"{n_vol / median(ours_s):.2f}", f"{epoch_ms:.0f}",
         f"{point:.3f}", f"{lo:.3f}–{hi:.3f}"],
        ["epoch-end checkpoint (save_checkpoint)", "", f"{median(ckpt_ms):.0f}", "", f"{ckpt_mb:.1f} MB per checkpoint"],
    ]
    ratio = make_ratio("Trainer / bare epoch time, 95 % CI upper bound", hi, limit, "<=", text=text)
    model = f"{cfg.model.name} {cfg.model.params}"
    result = make_result(
        "trainer_overhead", "Trainer overhead vs a bare PyTorch loop", argv, quick=args.quick,
        config={"config": args.config, "model": model, "shape": args.shape, "batch": args.batch, "steps": args.steps,
                "pairs": args.pairs, "threads": args.threads, "device": args.device, "log_every": args.log_every},
        headers=["loop", "volumes/s (median)", "ms per epoch (median)", "time vs bare", "95 % CI / size"],
        rows=rows, ratio=ratio, machine=machine,
        notes=[f"{model} at {'x'.join(map(str, args.shape))}, batch {args.batch}, {args.steps} steps per epoch, "
               f"{args.pairs} pairs of epochs interleaved ABBA, both sides restarted from the same weights and optimizer "
               f"state every epoch, {args.threads} torch threads, {args.device}; data in memory, no validation.",
               "The ratio is mean trainer epoch time / mean bare epoch time; the CI is a percentile bootstrap over the "
               "pairs (10,000 resamples). The sentence in the headline follows from the CI alone.",
               f"The checkpoint fit() writes at every epoch end is timed apart: median {median(ckpt_ms):.0f} ms over "
               f"{args.checkpoints} saves ({ckpt_mb:.1f} MB each), {100 * median(ckpt_ms) / epoch_ms:.1f} % of one "
               f"{args.steps}-step epoch here."],
        epoch_seconds={"trainer": ours_s, "bare": bare_s}, ratio_ci={"point": point, "lo": lo, "hi": hi},
        checkpoint_ms=ckpt_ms, checkpoint_mb=ckpt_mb,
    )
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
