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
    parser.add_argument(
        "--raw-bids",
        default=None,
        metavar="DIR",
        help="also write every subject as a raw head scan (skull, scalp, neck, tilt, bias field) in a BIDS tree",
    )
    parser.add_argument("--raw-voxel-mm", type=float, nargs=3, default=[1.0, 1.0, 1.2], metavar=("X", "Y", "Z"),
                        help="voxel size of the raw heads (default 1 1 1.2)")
    parser.add_argument("--raw-max-rotation-deg", type=float, default=15.0, help="head tilt up to +-this (default 15)")
    parser.add_argument("--raw-orientation", default="random", choices=["random", "RAS", "LPS"],
                        help="storage order of the raw heads (default: random per subject)")
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
    if args.raw_bids:
        from brainage_hpc.ingest.synthetic_raw import RawCohortConfig, make_raw_cohort

        if min(args.raw_voxel_mm) <= 0 or args.raw_max_rotation_deg < 0:
            import sys

            print("brainage synth: error: --raw-voxel-mm must be > 0 and --raw-max-rotation-deg >= 0", file=sys.stderr)
            return 2
        raw_cfg = RawCohortConfig(voxel_mm=tuple(args.raw_voxel_mm), max_rotation_deg=args.raw_max_rotation_deg,
                                  orientation=args.raw_orientation, seed=args.seed)
        make_raw_cohort(args.out, args.raw_bids, raw_cfg)
        print(f"wrote {len(truths)} raw head scans as BIDS to {args.raw_bids} (participants.tsv, acquisition.json)")
    return 0
