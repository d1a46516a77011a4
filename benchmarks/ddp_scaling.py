"""DDP scaling on CPU: 1 vs 2 processes of ``brainage train`` (torchrun, gloo) at equal per-rank batch.

``python -m benchmarks.ddp_scaling [--quick] [--out benchmarks/results/ddp_scaling.json]``

Each case is a real ``python -m torch.distributed.run --nproc_per_node N -m
brainage_hpc.cli train --config cnn_demo ...`` on cached synthetic shards
(``bench_out/data``), ``train.backend=ddp``, fp32, ``data.cache=memory`` and
augmentation off (so loading is not measured), no validation. The per-rank
batch is the same in every case (``data.batch_size`` is global, so it is
``N x --batch``). Throughput is the trainer's own ``perf/volumes_per_s``
(volumes of all ranks / rank 0's step time) from ``metrics.jsonl``; the first
``--skip`` log lines of each run are warm-up, and the median over the rest of
all ``--repeats`` runs is reported. Cases run interleaved. Every run also
checkpoints every ``--ckpt-every`` steps (as a real run does), and its
end-to-end wall time (torchrun start to exit: start-up, data caching, training,
checkpoints, shutdown) is reported next to the steady-state throughput.

Cases: 1 process x 1 thread, 2 processes x 1 thread each (the fair pair on a
2-core machine: the same cores, the same work per core), and 1 process x 2
threads (what a single process gets from both cores by intra-op threading).
Target (DESIGN.md section 7): 2 processes >= 1.6x one process.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
)
from brainage_hpc.engine.distributed import free_port

__all__ = ["main", "Case", "train_command", "window_rates"]

TARGET = 1.6


@dataclass(frozen=True)
class Case:
    """One launch layout: processes and torch threads per process."""

    nproc: int
    threads: int

    @property
    def label(self) -> str:
        return f"{self.nproc} process{'es' if self.nproc > 1 else ''} x {self.threads} thread{'s' if self.threads > 1 else ''}"

    @property
    def key(self) -> str:
        return f"{self.nproc}p{self.threads}t"


CASES = (Case(1, 1), Case(2, 1), Case(1, 2))


def train_command(nproc: int, run_dir: Path, shards: Path, shape: list[int], per_rank_batch: int, steps: int,
                  log_every: int, config: str = "cnn_demo", precision: str = "32", extra: list[str] | None = None,
                  ckpt_every: int = 0) -> list[str]:
    """The torchrun command of one benchmark run."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
        "-m", "brainage_hpc.cli", "train", "--config", config, "--run-dir", str(run_dir), "--resume", "none",
        f"data.shards={shards}", f"data.shape=[{','.join(map(str, shape))}]", f"data.batch_size={per_rank_batch * nproc}",
        "data.cache=memory", "data.num_workers=0", "data.pin_memory=false", "data.persistent_workers=false",
        "data.augment.enabled=false", "data.val_split=", "train.backend=ddp", f"train.precision={precision}",
        "train.grad_accum=1", f"train.max_steps={steps}", f"train.log_every_steps={log_every}", f"train.ckpt_every_steps={ckpt_every}",
        "train.progress=false", "train.keep_last=1", *(extra or []),
    ]


def window_rates(metrics: Path, skip: int) -> tuple[list[float], list[float]]:
    """``perf/volumes_per_s`` and ``perf/data_wait_fraction`` of each log line after the first ``skip``."""
    recs = [r for r in read_jsonl(metrics) if "perf/volumes_per_s" in r]
    if len(recs) <= skip:
        raise RuntimeError(f"{metrics}: {len(recs)} throughput lines, need more than --skip {skip}; raise --steps")
    recs = recs[skip:]
    return [float(r["perf/volumes_per_s"]) for r in recs], [float(r.get("perf/data_wait_fraction", float("nan"))) for r in recs]


def _run(case: Case, run_dir: Path, args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = train_command(case.nproc, run_dir, shards, args.shape, args.batch, args.steps, args.log_every,
                        args.config, args.precision, args.override, args.ckpt_every)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(case.threads), cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{case.label}: exit {proc.returncode}\n$ {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    vps, wait = window_rates(run_dir / "metrics.jsonl", args.skip)
    ckpts = len(list(run_dir.glob("ckpt-step*")))  # kept after pruning (keep_last=1); written: steps // ckpt_every + 1
    print(f"  {case.label}: median {median(vps):.2f} volumes/s over {len(vps)} windows, wall {wall:.0f} s", file=sys.stderr)
    return {"vps": vps, "data_wait": wait, "wall_s": wall, "checkpoints_kept": ckpts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps, one repeat (a smoke run, not a measurement)")
    p.add_argument("--config", default="cnn_demo")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 56, 48], metavar=("D", "H", "W"))
    p.add_argument("--voxel-mm", type=float, default=3.0)
    p.add_argument("--subjects", type=int, default=None, help="subjects in the cached shard set (default 128; quick 16)")
    p.add_argument("--batch", type=int, default=8, help="per-rank batch (default 8)")
    p.add_argument("--precision", default="32", help="train.precision (default 32)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 48; quick 6)")
    p.add_argument("--log-every", type=int, default=None, help="steps per throughput window (default 4; quick 2)")
    p.add_argument("--skip", type=int, default=None, help="warm-up windows dropped per run (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="runs per case (default 2; quick 1)")
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every N steps (default 16; quick 3)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/ddp_scaling.json)")
    args = p.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 48)
    args.log_every = args.log_every or (2 if args.quick else 4)
    args.skip = args.skip if args.skip is not None else (1 if args.quick else 2)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.ckpt_every = args.ckpt_every or (3 if args.quick else 16)
    args.subjects = args.subjects or (16 if args.quick else 128)
    out = args.out or str(result_path("ddp_scaling", args.quick))
    machine = machine_info()

    shards = bench_shards(args.subjects, args.shape, args.voxel_mm)
    runs_root = BENCH_OUT / "runs" / "ddp_scaling"
    results: dict[str, dict[str, Any]] = {c.key: {"vps": [], "data_wait": [], "wall_s": []} for c in CASES}
    for rep in range(args.repeats):
        for case in CASES:
            r = _run(case, runs_root / f"{case.key}_{rep}", args, shards)
            for k in ("vps", "data_wait"):
                results[case.key][k].extend(r[k])
            results[case.key]["wall_s"].append(r["wall_s"])

    med = {k: median(v["vps"]) for k, v in results.items()}
    base = med["1p1t"]
    rows = []
    e2e = {c.key: args.steps * c.nproc * args.batch / median(results[c.key]["wall_s"]) for c in CASES}
    for case in CASES:
        r = results[case.key]
        rows.append([case.label, case.nproc * args.batch, f"{med[case.key]:.2f}",
                     f"{min(r['vps']):.2f}–{max(r['vps']):.2f}", f"{med[case.key] / case.nproc:.2f}",
                     f"{median(r['data_wait']):.3f}", f"{med[case.key] / base:.2f}x",
                     f"{median(r['wall_s']):.1f}", f"{e2e[case.key]:.2f}", f"{e2e[case.key] / e2e['1p1t']:.2f}x"])
    scaling = med["2p1t"] / base
    vs_threads = med["2p1t"] / med["1p2t"]
    e2e_scaling = e2e["2p1t"] / e2e["1p1t"]
    ratio = make_ratio("2 processes / 1 process volumes/s", scaling, TARGET, ">=",
                       text=f"2 processes / 1 process (1 thread each) = {scaling:.2f}x (target ≥ {TARGET}x)")
    ratio_e2e = make_ratio("2 processes / 1 process, end to end", e2e_scaling, None,
                           text=f"end to end (wall time incl. start-up and checkpoints) 2 / 1 process = {e2e_scaling:.2f}x")
    result = make_result(
        "ddp_scaling", "DDP scaling on CPU (torchrun, gloo)", argv, quick=args.quick,
        config={"config": args.config, "shape": args.shape, "voxel_mm": args.voxel_mm, "subjects": args.subjects,
                "per_rank_batch": args.batch, "precision": args.precision, "steps": args.steps,
                "log_every": args.log_every, "skip": args.skip, "repeats": args.repeats, "shards": str(shards)},
        headers=["layout", "global batch", "volumes/s (median)", "range", "per process", "data wait", "vs 1x1",
                 "wall s (end to end)", "volumes/s end to end", "end to end vs 1x1"],
        rows=rows, ratio=ratio, ratios=[ratio, ratio_e2e], machine=machine,
        notes=[f"`brainage train --config {args.config}` under torchrun, ddp backend (gloo), precision {args.precision}, "
               f"{'x'.join(map(str, args.shape))}, per-rank batch {args.batch}, data.cache=memory, no augmentation, "
               f"no validation; {args.steps} steps per run, windows of {args.log_every} steps, first {args.skip} "
               f"dropped, {args.repeats} run(s) per layout; a checkpoint every {args.ckpt_every} steps and at the end.",
               "End to end = steps x global batch / wall time of the whole torchrun command (interpreter and "
               "process-group start-up, data caching, training, checkpoints, shutdown); median over the runs.",
               f"2 processes x 1 thread vs 1 process x 2 threads: {vs_threads:.2f}x."],
        runs=results, scaling=scaling, scaling_vs_threads=vs_threads, end_to_end_vps=e2e, end_to_end_scaling=e2e_scaling,
    )
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
