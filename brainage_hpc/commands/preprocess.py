"""``brainage preprocess``: cohorts (HCP, BIDS, CSV tables) -> verified HDF5 shards, manifest and splits.

One run does four things:

1. plan: read the cohorts (``--hcp-root`` and/or ``--cohort`` any number of
   times), join labels, make (or import) the splits, fit
   histogram landmarks on the training split if asked, assign subjects to shards
   in ID order (``--shard-size`` each) and write ``plan.json``;
2. process the selected shards with a process pool, skipping shards whose
   sidecar ``shard-XXXXX.json`` records the sha256 of the file on disk and the
   unchanged path, size and mtime of every input scan (``--force`` redoes all);
3. write each shard atomically, then its sidecar, so ``kill -9`` loses at most
   the shard being written and a rerun produces byte-identical files;
4. merge the sidecars into ``manifest.json`` and ``failures.csv`` (a full run
   does it itself; after a SLURM array run ``brainage preprocess --merge``).

Slices (``--subjects-from/--subjects-to`` or ``SLURM_ARRAY_TASK_ID``) select
whole shards (those whose first subject is in the slice), so parallel array
tasks never write the same file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from brainage_hpc.ingest.pipeline import PLAN_NAME, WorkerPool, fit_landmarks, merge_shards, process_shards

__all__ = ["add_arguments", "run"]

logger = logging.getLogger("brainage_hpc.preprocess")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hcp-root", help="folder of <subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz (+ CSVs)")
    parser.add_argument(
        "--cohort",
        action="append",
        default=[],
        metavar="[NAME=][KIND:]PATH",
        help="a cohort to add (repeatable): a BIDS root, a CSV/TSV table (subject,path,age,sex[,site,session,group]) "
        "or an HCP root; KIND (bids, csv, hcp) is detected when omitted, NAME defaults to the folder/file name",
    )
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json, failures.csv")
    parser.add_argument("--unrestricted", help="unrestricted CSV (default: unrestricted*.csv in --hcp-root)")
    parser.add_argument(
        "--restricted",
        help="restricted CSV with Age_in_Yrs, Family_ID (default: restricted*.csv in --hcp-root, optional)",
    )
    parser.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=[128, 128, 128])
    parser.add_argument("--voxel-mm", type=float, default=1.0, help="isotropic output voxel size in mm (default 1.0)")
    parser.add_argument(
        "--intensity", default="zscore", help="zscore (default) | histogram (landmarks fitted on train)"
    )
    parser.add_argument(
        "--pipeline",
        default="skullstripped",
        choices=["skullstripped", "raw"],
        help="skullstripped (default; HCP *_brain files) | raw (scanner T1w with skull: N4, MNI registration, deepbet)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="threads per worker for ANTs and deepbet (raw pipeline; default 1)"
    )
    parser.add_argument("--crop-margin-mm", type=float, default=2.0, help="margin around the brain bounding box")
    parser.add_argument("--shard-size", type=int, default=32, help="subjects per shard (default 32)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--compression", default="none", choices=["none", "lzf", "gzip"])
    parser.add_argument(
        "--subjects-from", type=int, default=None, help="slice start (index into the sorted usable subjects)"
    )
    parser.add_argument("--subjects-to", type=int, default=None, help="slice end (exclusive)")
    parser.add_argument(
        "--shards-per-task", type=int, default=1, help="with SLURM_ARRAY_TASK_ID: shards per array task"
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "--split-fractions", type=float, nargs=3, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--seed-splits", help="folder with the seed's train.npy/val.npy/test.npy to use instead")
    parser.add_argument(
        "--max-fail-fraction", type=float, default=0.1, help="exit 1 if more subjects failed (default 0.1)"
    )
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="write plan.json (subjects, splits, histogram landmarks) and stop; array tasks reuse it",
    )
    parser.add_argument("--merge", action="store_true", help="only merge finished shards into manifest.json")
    parser.add_argument(
        "--count-shards",
        action="store_true",
        help="print the number of shards the cohorts make (reads labels and file names only) and exit; "
        "slurm/preprocess_array.sh sizes its array with it",
    )
    parser.add_argument(
        "--force", action="store_true", help="redo every selected shard (default: redo only missing, damaged or stale ones)"
    )
    parser.add_argument("--no-progress", action="store_true")


def _fail(message: str) -> int:
    print(f"brainage preprocess: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from brainage_hpc.ingest.hcp import HCPError
    from brainage_hpc.ingest.preprocess import PreprocessConfig

    out = Path(args.out)
    if not 0 <= args.max_fail_fraction <= 1:
        return _fail(f"--max-fail-fraction must be in [0, 1], got {args.max_fail_fraction}")
    if args.merge:
        try:
            return merge_shards(out, args.max_fail_fraction)
        except (FileNotFoundError, ValueError) as exc:
            return _fail(str(exc))
    if not args.hcp_root and not args.cohort:
        return _fail("--hcp-root or --cohort is required (or pass --merge)")
    if args.shard_size < 1 or args.workers < 1 or args.shards_per_task < 1 or args.threads < 1:
        return _fail("--shard-size, --workers, --threads and --shards-per-task must be >= 1")
    try:
        cfg = PreprocessConfig(
            shape=tuple(args.shape),
            voxel_mm=args.voxel_mm,
            intensity=args.intensity,
            crop_margin_mm=args.crop_margin_mm,
            pipeline=args.pipeline,
        )
        plan = _build_plan(args, cfg)
        if args.count_shards:
            print(math.ceil(len(plan["subjects"]) / plan["shard_size"]))
            return 0
        out.mkdir(parents=True, exist_ok=True)
    except (HCPError, FileNotFoundError, ValueError, OSError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    from brainage_hpc.ingest.shard_writer import write_json

    n_subjects, size = len(plan["subjects"]), plan["shard_size"]
    n_shards = math.ceil(n_subjects / size)
    with WorkerPool(args.workers, threads=args.threads) as pool:
        try:
            selected, sliced = _select_shards(args, n_subjects, n_shards, size)
            if plan["preprocess"]["intensity"] == "histogram" and plan["preprocess"]["landmarks"] is None:
                plan = fit_landmarks(plan, out, pool)
        except ValueError as exc:
            return _fail(str(exc))
        write_json(out / PLAN_NAME, plan)
        if args.plan_only:
            print(
                f"plan: {n_subjects} subjects in {n_shards} shards, {len(plan['failures'])} failed -> {out / PLAN_NAME}"
            )
            return 0
        try:
            hashes = process_shards(plan, out, selected, pool, progress=not args.no_progress, force=args.force)
        except BrokenProcessPool:
            print(
                "brainage preprocess: error: a worker process died (out of memory? try fewer --workers); "
                "rerun the same command to resume",
                file=sys.stderr,
            )
            return 1
        except OSError as exc:
            print(f"brainage preprocess: error: writing to {out} failed ({exc}); rerun to resume", file=sys.stderr)
            return 1
    if sliced:
        print(
            f"processed shards {_ranges(selected) or 'none'} of {n_shards}; when every task is done run: "
            f"brainage preprocess --merge --out {out}"
        )
        return 0
    return merge_shards(out, args.max_fail_fraction, known_hashes=hashes)


# ----------------------------------------------------------------------------- planning


def _build_plan(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    from brainage_hpc.ingest.cohorts import CohortSpec, parse_cohort_arg
    from brainage_hpc.ingest.plan import build_plan

    specs = []
    if args.hcp_root:
        specs.append(CohortSpec(kind="hcp", path=args.hcp_root, unrestricted=args.unrestricted, restricted=args.restricted))
    specs += [parse_cohort_arg(text) for text in args.cohort]
    return build_plan(
        specs,
        cfg.to_dict(),
        cfg.config_hash(),
        shard_size=args.shard_size,
        compression=args.compression,
        split_fractions=args.split_fractions,
        split_seed=args.split_seed,
        seed_splits=args.seed_splits,
    )


def _select_shards(args: argparse.Namespace, n_subjects: int, n_shards: int, size: int) -> tuple[list[int], bool]:
    """Shards this invocation owns, and whether it is a slice of a larger (array) run."""
    if args.subjects_from is not None or args.subjects_to is not None:
        lo = args.subjects_from or 0
        hi = n_subjects if args.subjects_to is None else args.subjects_to
        if lo < 0 or hi < lo:
            raise ValueError(f"--subjects-from {lo} --subjects-to {hi}: need 0 <= from <= to")
        return [k for k in range(n_shards) if lo <= k * size < hi], True
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is not None:
        if not task.isdigit():
            raise ValueError(f"SLURM_ARRAY_TASK_ID={task!r} is not a non-negative integer")
        first = int(task) * args.shards_per_task
        logger.info("SLURM array task %s: shards %d..%d of %d", task, first, first + args.shards_per_task - 1, n_shards)
        return list(range(first, min(first + args.shards_per_task, n_shards))), True
    return list(range(n_shards)), False


def _ranges(ks: list[int]) -> str:
    return f"{ks[0]}..{ks[-1]}" if len(ks) > 1 else (str(ks[0]) if ks else "")
