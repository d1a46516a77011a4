"""GPU benchmark: SFCN at 160x192x160 and the seed CNN at 128^3; precision, channels-last, batch size, loader.

``python -m benchmarks.gpu [--quick] [--out benchmarks/results/gpu.json]``

Part 1, model sweep (synthetic batches already on the GPU): for each model,
fp32 and bf16 autocast, channels-last off and on, batch sizes 1, 2, 4, ... until
``torch.cuda.OutOfMemoryError`` (or ``--max-batch``): training-step
volumes/s (forward, backward, optimizer step), peak allocated memory and the
GPU busy share (``torch.cuda.utilization`` or ``nvidia-smi
--query-gpu=utilization.gpu`` sampled in a thread during the timed steps).
cuDNN autotuning is on; ``--warmup`` steps are untimed.

Part 2, the real pipeline: ``brainage train --config sfcn_hcp`` (bf16,
channels-last, GPU augmentation) on cached synthetic shards at 160x192x160 /
1 mm, once GPU-resident (``data.cache=gpu``) and once through the DataLoader
(``data.cache=none``, ``--workers`` processes): the trainer's volumes/s and
data-wait fraction from ``metrics.jsonl`` and the GPU busy share over the
same windows. Target (DESIGN.md section 7): the pipeline keeps the GPU
>= 90 % busy.

Part 3, host-device syncs: the real ``Trainer`` (in this process, synthetic
batches on the device) runs one epoch under ``torch.cuda.set_sync_debug_mode("warn")``;
every synchronising CUDA call (``.item()``, ``.tolist()``, a blocking copy, a
``nonzero``...) raises a warning, which is counted per optimizer step and by
source line (DESIGN.md section 7: O(1) per logging interval, not per micro-batch).

Without CUDA it prints "no GPU: skipped", writes a JSON saying so and exits 0.
``--device cpu`` runs the same code on the CPU (for checking it; use small
``--sfcn-shape/--cnn-shape/--loader-shape``).
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BENCH_OUT,
    REPO,
    bench_shards,
    child_env,
    finish,
    machine_info,
    make_ratio,
    make_result,
    median,
    read_jsonl,
    result_path,
    sync,
)

__all__ = ["main", "BusySampler", "count_syncs", "sweep_model", "train_step_rate"]

TARGET_BUSY = 0.90
log = logging.getLogger("benchmarks.gpu")


class BusySampler:
    """GPU utilisation (percent of time a kernel ran) sampled every ``interval`` s in a thread.

    Uses ``torch.cuda.utilization`` (needs pynvml) when it works, else one
    long-running ``nvidia-smi --query-gpu=utilization.gpu -lms``; ``source`` is
    ``None`` when neither is available (then ``share`` returns NaN).
    """

    def __init__(self, device_index: int = 0, interval: float = 0.1) -> None:
        self.index, self.interval = device_index, interval
        self.samples: list[tuple[float, float]] = []  # (time.time(), percent)
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> "BusySampler":
        if not torch.cuda.is_available():
            return self
        try:
            torch.cuda.utilization(self.index)
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll, daemon=True)
        except Exception:
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"
                ms = max(int(self.interval * 1000), 50)
                self._proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i",
                     _smi_index(self.index), f"--loop-ms={ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self._thread = threading.Thread(target=self._read, daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), float(torch.cuda.utilization(self.index))))
            self._stop.wait(self.interval)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip())))
            except ValueError:
                continue
            if self._stop.is_set():
                break

    def share(self, t0: float, t1: float) -> float:
        """Mean busy fraction (0..1) of the samples taken in [t0, t1] (``time.time()`` seconds)."""
        vals = [v for t, v in list(self.samples) if t0 <= t <= t1]
        return sum(vals) / len(vals) / 100.0 if vals else float("nan")

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def _nanmax(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return max(vals) if vals else float("nan")


def _smi_index(index: int) -> str:
    """The ``nvidia-smi -i`` id of torch device ``index`` (honours a numeric CUDA_VISIBLE_DEVICES)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def train_step_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
                    dtype: torch.dtype | None, warmup: int, min_steps: int, seconds: float, device: torch.device,
                    sampler: BusySampler) -> dict[str, float]:
    """Time training steps on one batch: volumes/s, steps, peak memory (GB) and GPU busy share."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(batch)
        out["loss"].backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync(device)
    t_wall0, t0, n = time.time(), time.perf_counter(), 0
    while n < min_steps or time.perf_counter() - t0 < seconds:
        step()
        n += 1
        if n >= min_steps:
            sync(device)
    sync(device)
    dt, t_wall1 = time.perf_counter() - t0, time.time()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"vps": n * batch["image"].shape[0] / dt, "steps": n, "seconds": dt, "peak_gb": peak,
            "busy": sampler.share(t_wall0, t_wall1)}


def _batch(b: int, shape: tuple[int, ...], device: torch.device, channels_last: bool) -> dict[str, Any]:
    age = 22 + 14 * torch.rand(b, device=device)
    image = torch.randn(b, 1, *shape, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    return {"image": image, "age": age, "sex": (torch.rand(b, device=device) > 0.5).float(),
            "label": ((age - 22) // 4).long().clamp(0, 3), "age_bin": ((age - 22) // 4).long().clamp(0, 3)}


def sweep_model(config: str, shape: tuple[int, ...], batches: list[int], args: argparse.Namespace,
                device: torch.device, sampler: BusySampler) -> list[dict[str, Any]]:
    """All (precision, channels-last, batch) points of one model; a batch sweep stops at the first OOM."""
    import dataclasses

    from brainage_hpc.config import load_config
    from brainage_hpc.engine.run import make_optimizer
    from brainage_hpc.models.registry import build_model

    cfg = load_config(config)
    points = []
    for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for cl in (False, True):
            mcfg = dataclasses.replace(cfg.model, channels_last=cl, compile=False)
            torch.manual_seed(0)
            model = build_model(mcfg, shape).to(device).train()
            optimizer = make_optimizer(cfg.train, model)
            for b in batches:
                point: dict[str, Any] = {"model": cfg.model.name, "config": config, "shape": list(shape),
                                         "precision": prec, "channels_last": cl, "batch": b}
                try:
                    point.update(train_step_rate(model, optimizer, _batch(b, shape, device, cl), dtype, args.warmup,
                                                 args.min_steps, args.seconds, device, sampler))
                except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                    if _is_oom(exc):
                        point["oom"] = True
                    elif b == batches[0]:
                        raise  # the smallest batch fails: a real error, not a size limit
                    else:  # e.g. a kernel's 32-bit indexing limit at a huge batch: the end of this sweep too
                        point["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}"
                optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                points.append(point)
                failed = point.get("oom") or point.get("error")
                status = ("OOM" if point.get("oom") else point["error"]) if failed else (
                    f"{point['vps']:.1f} vol/s, {point['peak_gb']:.1f} GB, busy {point['busy']:.2f}")
                print(f"  {config} {prec} cl={int(cl)} b={b}: {status}", file=sys.stderr)
                if failed:
                    break
            del model, optimizer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return points


def _loader_run(mode: str, shards: Path, args: argparse.Namespace, sampler: BusySampler) -> dict[str, Any]:
    run_dir = BENCH_OUT / "runs" / "gpu" / f"loader_{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cache = "gpu" if mode == "gpu-resident" else "none"
    cmd = [sys.executable, "-m", "brainage_hpc.cli", "train", "--config", args.loader_config, "--run-dir", str(run_dir),
           "--resume", "none", f"data.shards={shards}", f"data.shape=[{','.join(map(str, args.loader_shape))}]",
           f"data.batch_size={args.loader_batch}", f"data.cache={cache}", f"data.num_workers={args.workers}",
           "data.val_split=", "train.backend=single", "train.precision=bf16-mixed", "model.channels_last=true",
           f"train.max_steps={args.loader_steps}", f"train.log_every_steps={args.log_every}", "train.ckpt_every_steps=0",
           "train.progress=false", "train.keep_last=1", "train.early_stop_patience=0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(args.threads), cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"loader run {mode}: exit {proc.returncode}\n$ {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "perf/volumes_per_s" in r]
    if len(recs) <= args.skip:
        raise RuntimeError(f"{run_dir}: {len(recs)} throughput lines; need more than --skip {args.skip}")
    kept = recs[args.skip:]
    t_from, t_to = recs[args.skip - 1]["time"] if args.skip > 0 else kept[0]["time"], kept[-1]["time"]
    log_text = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    actual = "gpu-resident" if cache == "gpu" and "using the DataLoader path" not in log_text else "dataloader"
    res = {"mode": mode, "actual_mode": actual, "cache": cache, "workers": args.workers,
           "vps": median([r["perf/volumes_per_s"] for r in kept]),
           "data_wait": median([r.get("perf/data_wait_fraction", float("nan")) for r in kept]),
           "busy": sampler.share(t_from, t_to), "peak_gb": _nanmax([r.get("perf/max_memory_gb", float("nan")) for r in kept]),
           "windows": len(kept), "wall_s": time.perf_counter() - t0}
    print(f"  loader {mode} ({actual}): {res['vps']:.1f} vol/s, data wait {res['data_wait']:.3f}, busy {res['busy']:.2f}",
          file=sys.stderr)
    return res


def count_syncs(device: torch.device, config: str = "cnn_demo", shape: tuple[int, int, int] = (48, 56, 48),
                batch: int = 4, steps: int = 8, log_every: int = 4, grad_accum: int = 1) -> dict[str, Any]:
    """Synchronising CUDA calls per optimizer step of the real ``Trainer`` (one epoch of ``steps`` steps).

    Runs one untimed epoch first (allocations, the TensorBoard writer), then one
    under ``torch.cuda.set_sync_debug_mode("warn")`` and counts the warnings.
    Without CUDA nothing can be counted: ``per_step`` is None.

    Returns:
        ``{"syncs", "steps", "per_step", "log_every", "grad_accum", "sources": {file:line: count}}``.
    """
    from benchmarks.trainer_overhead import _build

    out: dict[str, Any] = {"steps": steps, "log_every": log_every, "grad_accum": grad_accum, "syncs": None,
                           "per_step": None, "sources": {}}
    ns = argparse.Namespace(config=config, shape=list(shape), batch=batch, steps=steps * grad_accum, log_every=log_every,
                            override=[f"train.grad_accum={grad_accum}"])
    with tempfile.TemporaryDirectory(prefix="bench_syncs_") as tmp:
        trainer, *_ = _build(ns, Path(tmp), device)
        trainer.train_epoch()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.train_epoch()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
            out["syncs"] = len(hits)
            out["per_step"] = len(hits) / steps
            out["sources"] = dict(collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in hits).most_common(8))
        else:
            trainer.train_epoch()  # the same code path runs; nothing to count without CUDA
        trainer.logger.close()
    return out


def _skipped(args: argparse.Namespace, argv: list[str] | None, reason: str) -> int:
    print(f"no GPU: skipped ({reason})")
    result = make_result("gpu", "GPU throughput (SFCN 160x192x160, seed CNN 128^3)", argv, quick=args.quick,
                         config={}, headers=["status"], rows=[[f"no GPU: skipped ({reason})"]], ratio=None,
                         notes=["No CUDA GPU on the machine that ran this (no device was lent to the session). The script is ready: "
                                "`python -m benchmarks.gpu` on a CUDA machine measures SFCN at 160x192x160 and the seed CNN at 128^3, "
                                "fp32 vs bf16, channels-last on/off, a batch sweep to the memory limit (volumes/s, peak memory), "
                                "GPU busy share and the data-wait fraction with the real loader."], skipped=True, reason=reason)
    return finish(result, args.out)


def _fmt(v: float, spec: str = ".1f") -> str:
    return "–" if v != v else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1-2, short timings, short loader runs")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to check the code")
    p.add_argument("--models", nargs="+", default=["sfcn", "cnn3d"], choices=["sfcn", "cnn3d"])
    p.add_argument("--sfcn-shape", type=int, nargs=3, default=[160, 192, 160])
    p.add_argument("--cnn-shape", type=int, nargs=3, default=[128, 128, 128])
    p.add_argument("--max-batch", type=int, default=None, help="largest batch tried (default 256; quick 2)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-steps", type=int, default=None, help="timed steps at least (default 5; quick 2)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds at least per point (default 3; quick 0.5)")
    p.add_argument("--no-loader", action="store_true", help="skip part 2 (the real pipeline)")
    p.add_argument("--no-syncs", action="store_true", help="skip part 3 (host-device syncs per step)")
    p.add_argument("--loader-config", default="sfcn_hcp")
    p.add_argument("--loader-shape", type=int, nargs=3, default=[160, 192, 160])
    p.add_argument("--loader-voxel-mm", type=float, default=1.0)
    p.add_argument("--loader-subjects", type=int, default=None, help="subjects in the shard set (default 128; quick 32)")
    p.add_argument("--loader-batch", type=int, default=8, help="batch of the loader runs (default 8, sfcn_hcp's per GPU)")
    p.add_argument("--loader-steps", type=int, default=None, help="steps per loader run (default 48; quick 8)")
    p.add_argument("--log-every", type=int, default=None, help="steps per window (default 4; quick 2)")
    p.add_argument("--skip", type=int, default=None, help="warm-up windows dropped (default 2; quick 1)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default min(8, CPUs))")
    p.add_argument("--threads", type=int, default=4, help="OMP threads of the training process (default 4)")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/gpu.json)")
    args = p.parse_args(argv)
    q = args.quick
    args.max_batch = args.max_batch or (2 if q else 256)
    args.min_steps = args.min_steps or (2 if q else 5)
    args.seconds = args.seconds if args.seconds is not None else (0.5 if q else 3.0)
    args.loader_subjects = args.loader_subjects or (32 if q else 128)
    args.loader_steps = args.loader_steps or (8 if q else 48)
    args.log_every = args.log_every or (2 if q else 4)
    args.skip = args.skip if args.skip is not None else (1 if q else 2)
    args.workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    args.out = args.out or str(result_path("gpu", q))
    logging.basicConfig(level=logging.WARNING)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return _skipped(args, argv, f"torch {torch.__version__}: torch.cuda.is_available() is False")
    machine = machine_info()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b <= args.max_batch]
    shapes = {"sfcn": ("sfcn_hcp", tuple(args.sfcn_shape)), "cnn3d": ("cnn_hcp", tuple(args.cnn_shape))}
    sampler = BusySampler(device.index or 0).start()
    try:
        points: list[dict[str, Any]] = []
        for name in args.models:
            config, shape = shapes[name]
            points += sweep_model(config, shape, batches, args, device, sampler)
        loader_runs: list[dict[str, Any]] = []
        if not args.no_loader:
            shards = bench_shards(args.loader_subjects, args.loader_shape, args.loader_voxel_mm,
                                  workers=min(8, os.cpu_count() or 1))
            for mode in ("gpu-resident", "dataloader"):
                loader_runs.append(_loader_run(mode, shards, args, sampler))
        syncs = [] if args.no_syncs else [count_syncs(device, steps=4 if q else 8, log_every=2 if q else 4, grad_accum=g)
                                          for g in (1, 2)]
    finally:
        sampler.stop()

    rows = []
    for pt in points:
        label = f"{pt['model']} {'x'.join(map(str, pt['shape']))}"
        if pt.get("oom") or pt.get("error"):
            what = "OOM" if pt.get("oom") else f"failed ({pt['error']})"
            rows.append([label, pt["precision"], "on" if pt["channels_last"] else "off", pt["batch"], what, "–", "–", "–"])
        else:
            rows.append([label, pt["precision"], "on" if pt["channels_last"] else "off", pt["batch"], _fmt(pt["vps"]),
                         _fmt(pt["peak_gb"]), _fmt(pt["busy"], ".2f"), "– (synthetic, on device)"])
    for r in loader_runs:
        how = "GPU-resident" if r["actual_mode"] == "gpu-resident" else f"DataLoader, {r['workers']} workers"
        if r["actual_mode"] != r["mode"]:
            how += f"; data.cache={r['cache']} fell back"
        rows.append([f"{args.loader_config} pipeline {'x'.join(map(str, args.loader_shape))}, data.cache={r['cache']}",
                     "bf16", "on", args.loader_batch, _fmt(r["vps"]), _fmt(r["peak_gb"]), _fmt(r["busy"], ".2f"),
                     f"{_fmt(r['data_wait'], '.3f')} ({how})"])
    best = {}
    for pt in points:
        if not (pt.get("oom") or pt.get("error")):
            key = (pt["model"], pt["precision"])
            if key not in best or pt["vps"] > best[key]["vps"]:
                best[key] = pt
    notes = [f"GPU: {(machine.get('gpu') or {}).get('name', args.device)}; busy share from {sampler.source or 'no sampler'}; "
             f"sweep: training steps on synthetic on-device batches, {args.warmup} warm-up steps, then at least "
             f"{args.min_steps} steps and {args.seconds:g} s; cuDNN benchmark and TF32 on."]
    notes += [f"best {m} {pr}: batch {pt['batch']}, channels-last {'on' if pt['channels_last'] else 'off'}, "
              f"{pt['vps']:.1f} volumes/s, {_fmt(pt['peak_gb'])} GB" for (m, pr), pt in best.items()]
    for s in syncs:
        where = ", ".join(f"{k} ({v})" for k, v in s["sources"].items()) or "–"
        per = "n/a without CUDA" if s["per_step"] is None else f"{s['per_step']:.2f}"
        notes.append(f"Host-device syncs per optimizer step (Trainer, grad_accum {s['grad_accum']}, log every "
                     f"{s['log_every']} steps, {s['steps']} steps): {per}; sources: {where}.")
    ratio = None
    if loader_runs:
        main_run = loader_runs[0]
        busy = main_run["busy"]
        source = "GPU busy share"
        if busy != busy:  # no utilisation sampler: fall back to the trainer's own measure
            busy, source = 1.0 - main_run["data_wait"], "1 - data-wait fraction"
        ratio = make_ratio("GPU busy share with the real pipeline", busy, TARGET_BUSY, ">=",
                           text=f"{source} with the real pipeline ({main_run['actual_mode']}) = {busy:.2f} (target ≥ {TARGET_BUSY})")
    result = make_result(
        "gpu", "GPU throughput (SFCN 160x192x160, seed CNN 128^3)", argv, quick=q, machine=machine,
        config={k: v for k, v in vars(args).items() if k not in ("out",)},
        headers=["model", "precision", "channels-last", "batch", "volumes/s", "peak GB", "GPU busy", "data wait"],
        rows=rows, ratio=ratio, notes=notes, points=points, loader_runs=loader_runs, busy_source=sampler.source,
        syncs=syncs,
    )
    return finish(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
