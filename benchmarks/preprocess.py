"""Preprocessing benchmark: subjects/s of ``brainage preprocess`` with 1 and 2 workers.

``python -m benchmarks.preprocess [--quick] [--n 24] [--workers 1 2] [--out benchmarks/results/preprocess.json]``

Builds (once, kept in ``--work``) a synthetic HCP-layout cohort at ``--input-mm``
(2 mm, 99x117x95 int16 NIfTI by default), then times the whole ``brainage
preprocess`` command in this process (discovery, splits, the process pool,
writing and hashing shards, the manifest) for each worker count, after one
warm-up call so the MONAI import is not counted. Also reports the median
single-thread time of ``preprocess_volume`` alone, and shard size plus
write/read speed for each compression, to choose the default.

Prints a markdown table row per worker count and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]


def _cohort(work: Path, n: int, input_mm: float) -> Path:
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    root = work / f"cohort_n{n}_{input_mm:g}mm"
    if not (root / "truth.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_cohort(root, SynthConfig(n_subjects=n, seed=0, voxel_mm=input_mm), progress=True, workers=2)
    return root


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its finished children (the pool workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _volume_times(root: Path, cfg: Any, k: int = 8) -> list[float]:
    import torch

    from brainage_hpc.ingest.hcp import discover_subjects
    from brainage_hpc.ingest.preprocess import preprocess_volume

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = [r.t1w for r in discover_subjects(root).records[:k]]
    preprocess_volume(paths[0], cfg)  # warm-up
    times = []
    for p in paths:
        t0 = time.perf_counter()
        preprocess_volume(p, cfg)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return times


def _compression(shards: Path, tmp: Path) -> list[dict[str, Any]]:
    import h5py

    from brainage_hpc.ingest.shard_writer import write_shard

    with h5py.File(sorted(shards.glob("shard-*.h5"))[0], "r") as f:
        images = f["image"][()]
        subjects = [{"id": s.decode(), "age": None, "age_bin": 0, "sex": 0} for s in f["subject_id"][()]]
    rows = []
    for comp in ("none", "lzf", "gzip"):
        path = tmp / f"bench-{comp}.h5"
        t0 = time.perf_counter()
        write_shard(
            path, images, subjects, voxel_mm=1.0, affine=np.eye(4), preprocess={}, preprocess_hash="b", compression=comp
        )
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        with h5py.File(path, "r") as f:
            for i in range(len(subjects)):
                f["image"][i]
        t_read = time.perf_counter() - t0  # warm page cache: decompression cost, not disk
        rows.append(
            {
                "compression": comp,
                "mb_per_volume": path.stat().st_size / len(subjects) / 2**20,
                "write_volumes_per_s": len(subjects) / t_write,
                "read_volumes_per_s": len(subjects) / t_read,
            }
        )
        path.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 subjects to 32^3 (a smoke run, not a measurement)")
    p.add_argument("--n", type=int, default=None, help="subjects (default 24; quick 4)")
    p.add_argument("--input-mm", type=float, default=2.0, help="voxel size of the synthetic NIfTI inputs")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="output shape (default 128 128 128; quick 32 32 32)")
    p.add_argument("--voxel-mm", type=float, default=None, help="output voxel size (default 1; quick 5)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-size", type=int, default=None, help="subjects per shard (default 8; quick 2)")
    p.add_argument("--work", default="bench_out/preprocess_data", help="cohort (kept, reused) and scratch shards")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/preprocess.json)")
    args = p.parse_args(argv)
    q = args.quick
    args.n = args.n or (4 if q else 24)
    args.shape = args.shape or ([32] * 3 if q else [128] * 3)
    args.voxel_mm = args.voxel_mm or (5.0 if q else 1.0)
    args.shard_size = args.shard_size or (2 if q else 8)
    from benchmarks.common import finish, machine_info, make_ratio, make_result, result_path

    args.out = args.out or str(result_path("preprocess", q))
    machine = machine_info()

    import logging

    from brainage_hpc.cli import main as cli_main
    from brainage_hpc.ingest.preprocess import PreprocessConfig

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = _cohort(work, args.n, args.input_mm)
    cfg = PreprocessConfig(shape=tuple(args.shape), voxel_mm=args.voxel_mm)
    common = [
        "--hcp-root",
        str(root),
        "--shape",
        *map(str, args.shape),
        "--voxel-mm",
        str(args.voxel_mm),
        "--shard-size",
        str(args.shard_size),
        "--no-progress",
    ]
    vol_times = _volume_times(root, cfg, k=2 if q else 8)
    runs = []
    for workers in args.workers:
        out = work / f"shards_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cpu0 = _cpu_s()
        t0 = time.perf_counter()
        rc = cli_main(["preprocess", "--out", str(out), "--workers", str(workers), *common])
        wall = time.perf_counter() - t0
        cpu = _cpu_s() - cpu0
        if rc != 0:
            print(f"benchmarks.preprocess: error: brainage preprocess exited {rc}", file=sys.stderr)
            return rc
        runs.append(
            {
                "workers": workers,
                "subjects": args.n,
                "wall_s": wall,
                "subjects_per_s": args.n / wall,
                "cpu_s_per_subject": cpu / args.n,  # this process + its pool workers; load-independent
            }
        )
    comp = _compression(work / f"shards_w{args.workers[0]}", work)

    shape = "x".join(map(str, args.shape))
    base = runs[0]["subjects_per_s"]
    rows = [[f"{args.input_mm:g} mm -> {shape} @ {args.voxel_mm:g} mm", r["workers"], r["subjects"], f"{r['wall_s']:.1f}",
             f"{r['subjects_per_s']:.2f}", f"{r['subjects_per_s'] / base:.2f}x", f"{r['cpu_s_per_subject']:.3f}"] for r in runs]
    notes = [f"`preprocess_volume` alone: {statistics.median(vol_times):.3f} s/subject (median of {len(vol_times)}, 1 thread)."]
    notes += ["Compression (shard size and speed): " + "; ".join(
        f"{c['compression']}: {c['mb_per_volume']:.2f} MB/volume, write {c['write_volumes_per_s']:.0f} vol/s, "
        f"read {c['read_volumes_per_s']:.0f} vol/s" for c in comp)]
    speedup = runs[-1]["subjects_per_s"] / base
    ratio = make_ratio(f"{runs[-1]['workers']} vs {runs[0]['workers']} workers", speedup, None,
                       text=f"`brainage preprocess` {runs[-1]['workers']} vs {runs[0]['workers']} worker(s) = {speedup:.2f}x "
                            f"({runs[-1]['subjects_per_s']:.1f} subjects/s)")
    result = make_result(
        "preprocess", "Preprocessing (brainage preprocess, whole command)", argv, quick=q, machine=machine,
        config={"input": f"synthetic {args.input_mm:g} mm NIfTI (int16, gzip)", "shape": list(args.shape),
                "voxel_mm": args.voxel_mm, "intensity": "zscore", "n": args.n},
        headers=["input -> output", "workers", "subjects", "wall s", "subjects/s", "speed-up", "CPU s/subject"],
        rows=rows, ratio=ratio, notes=notes, runs=runs, compression=comp,
        preprocess_volume_s={"median": statistics.median(vol_times), "min": min(vol_times), "n": len(vol_times)},
    )
    return finish(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
