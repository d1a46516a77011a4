"""``brainage gradcam``: 3D Grad-CAM / Grad-CAM++ maps of a trained run (NIfTI + PNG overlays)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run folder (plain or DeepSpeed) or an exported model.pt")
    parser.add_argument("--shards", required=True, help="shard folder written by `brainage preprocess`")
    parser.add_argument("--split", default="test", help="split to average over (default: test)")
    parser.add_argument("--subjects", nargs="+", default=None, help="subject IDs for individual maps (default: first --examples)")
    parser.add_argument("--examples", type=int, default=3, help="individual maps when --subjects is not given (default: 3)")
    parser.add_argument("--layer", default=None, help="module name, e.g. features.2 (default: the deepest conv block with >= 8 voxels per axis)")
    parser.add_argument("--method", choices=["gradcam", "gradcampp"], default="gradcam")
    parser.add_argument("--direction", choices=["both", "older", "younger"], default="both",
                        help="both (default): |evidence| either way; older/younger: only what raises/lowers the score")
    parser.add_argument("--weighting", choices=["elementwise", "pooled"], default="elementwise",
                        help="elementwise (default, HiResCAM: gradient x activation per position) or pooled (classic Grad-CAM)")
    parser.add_argument("--max-subjects", type=int, default=0, help="average over the first N subjects only (0: all)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default=None, help="output folder (default: RUN/gradcam-<split>)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 2 with a one-line error (bad run, shards, split, subject or layer)."""
    from brainage_hpc.interpret.gradcam import run_gradcam

    run_path = Path(args.run_dir)
    out = args.out or (run_path if run_path.is_dir() else run_path.parent) / f"gradcam-{args.split}"
    try:
        summary = run_gradcam(
            args.run_dir, args.shards, out, split=args.split, subjects=args.subjects, layer=args.layer,
            method=args.method, direction=args.direction, weighting=args.weighting, n_examples=args.examples, max_group=args.max_subjects,
            batch_size=args.batch_size, device=args.device,
        )
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"brainage gradcam: error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 2
    print(f"gradcam: {summary['method']} at layer {summary['layer']}: {len(summary['subjects'])} subject map(s), "
          f"group mean over {summary['n_group']} ({summary['n_zero_maps']} zero) -> {out}")
    return 0
