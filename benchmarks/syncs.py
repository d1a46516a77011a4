"""Host-device syncs per optimizer step of the training loop, now and before the sync-free step (issue 17.4).

``python -m benchmarks.syncs [--quick] [--before REV] [--out benchmarks/results/syncs.json]``

Counts, on CPU, the calls that would stall a GPU inside ``Trainer.train_epoch``
(:mod:`benchmarks.sync_counter`) for a short ``cnn_demo`` run on cached 32^3 synthetic
shards: logging once at the end, logging every 2 steps, and with gradient accumulation.
``--before`` runs the same counter on an older revision (default ``d0ba6e7^``, the last
commit before the sync-free step), checked out with ``git worktree`` under ``bench_out/``.
The counts do not depend on machine load. ``benchmarks/gpu.py`` measures the same on a GPU
with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import BENCH_OUT, REPO, bench_shards, finish, make_ratio, make_result, result_path

__all__ = ["main"]

BEFORE = "d0ba6e7^"
CASES = {  # label -> overrides
    "log once at the end, grad_accum 1": ["train.log_every_steps=1000", "train.grad_accum=1"],
    "log once at the end, grad_accum 2": ["train.log_every_steps=1000", "train.grad_accum=2"],
    "log every 2 steps, grad_accum 1": ["train.log_every_steps=2", "train.grad_accum=1"],
}
BASE = ["data.shape=[32,32,32]", "data.batch_size=2", "data.num_workers=0", "data.pin_memory=false",
        "data.persistent_workers=false", "data.augment.enabled=false", "model.name=cnn3d", "model.task=regress",
        "model.params={depth: 2, width: 4, dropout: 0.1}", "train.backend=single", "train.precision=32",
        "train.epochs=100", "train.ckpt_every_steps=0", "train.progress=false", "train.warmup_steps=0",
        "train.schedule=constant", "train.lr=3e-3"]


def _count(package_root: Path, shards: Path, steps: int, overrides: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "sync_counter.py"), str(shards), str(Path(tmp) / "run"), str(steps),
             *BASE, *overrides], env=env, cwd=tmp, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"sync counter failed on {package_root}: {out.stderr.strip().splitlines()[-1:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["syncs"])


def _worktree(rev: str) -> Path:
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    path = BENCH_OUT / f"worktree-{sha[:12]}"
    if not (path / "brainage_hpc").is_dir():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), sha], check=True,
                       capture_output=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.syncs", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 steps, no older revision (a smoke run)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default 12; quick 4)")
    p.add_argument("--before", default=BEFORE, help=f"older revision to count too (default {BEFORE}; '' for none)")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/syncs.json)")
    args = p.parse_args(argv)
    steps = args.steps or (4 if args.quick else 12)
    before = "" if args.quick else args.before
    out = args.out or str(result_path("syncs", args.quick))
    shards = bench_shards(24, (32, 32, 32), 4.0)
    roots = {"now": REPO}
    if before:
        roots[f"before ({before})"] = _worktree(before)
    counts = {label: {name: _count(root, shards, steps, ov) for name, root in roots.items()} for label, ov in CASES.items()}
    names = list(roots)
    rows = [[label, *[f"{c[n]} ({c[n] / steps:.2f} per step)" for n in names]] for label, c in counts.items()]
    worst = max(c["now"] / steps for c in counts.values())
    text = f"host-device syncs per optimizer step, now: at most {worst:.2f} (over {len(CASES)} settings, {steps} steps each)"
    if before:
        old = min(c[names[1]] / steps for c in counts.values())
        text += f"; before: at least {old:.2f}"
    result = make_result(
        "syncs", "Host-device syncs per training step (counted on CPU)", argv, quick=args.quick,
        config={"steps": steps, "before": before, "cases": CASES},
        headers=["setting", *[f"syncs in {steps} steps, {n}" for n in names]], rows=rows,
        ratio=make_ratio("syncs per step (most, now)", worst, None, text=text),
        notes=["Counted: Tensor.item/tolist/__bool__/__float__/__int__ called while Trainer.train_epoch runs "
               "(benchmarks/sync_counter.py); each would wait for the device on a GPU. Now the loss window, the "
               "non-finite flags and the stop agreement stay on the device and are read once per logging interval "
               "(engine/syncs.py host_values)."],
        counts=counts,
    )
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
