"""``brainage synth``: write a synthetic HCP-layout cohort (no download needed)."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (HCP S1200 layout)")
    parser.add_argument("--n-subjects", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-mm", type=float, default=2.0, help="isotropic voxel size (2.0 default; 1.0, 0.7 possible)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=None, help="crop/pad output grid")
    parser.add_argument("--difficulty", default="default", choices=["default", "realistic"],
                        help="default: easy, exaggerated atrophy; realistic: sites, anatomy spread, smaller slopes")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    if args.n_subjects < 1:
        raise ValueError(f"--n-subjects must be >= 1, got {args.n_subjects}")
    cfg = SynthConfig.preset(
        getattr(args, "difficulty", "default"),
        n_subjects=args.n_subjects,
        seed=args.seed,
        voxel_mm=args.voxel_mm,
        shape=tuple(args.shape) if args.shape else None,
    )
    truths = make_cohort(args.out, cfg, progress=not args.no_progress, workers=args.workers)
    print(f"wrote {len(truths)} subjects to {args.out} (unrestricted.csv, restricted.csv, freesurfer.csv)")
    return 0
