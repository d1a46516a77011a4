"""``brainage explain``: attribution maps of a run by several methods, each with its faithfulness."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from brainage_hpc.interpret.methods import METHODS

    parser.add_argument("--run-dir", required=True, help="run folder or exported model.pt")
    parser.add_argument("--shards", required=True, help="shard folder written by `brainage preprocess`")
    parser.add_argument("--method", nargs="+", default=["gradcam", "occlusion", "ig", "smoothgrad"],
                        help=f"methods: {', '.join(METHODS)} (counterfactual: CVAE runs only)")
    parser.add_argument("--truth", default="auto",
                        help="auto (default: |Pearson r| of intensity vs age over the train split), a NIfTI "
                             "(shard grid, or a synthetic cohort's truth/age_effect.nii.gz), or none")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-subjects", type=int, default=8, help="subjects explained (default 8)")
    parser.add_argument("--occlusion-subjects", type=int, default=4, help="subjects for occlusion, the slowest method (default 4)")
    parser.add_argument("--curve-subjects", type=int, default=2, help="subjects for deletion/insertion curves (default 2)")
    parser.add_argument("--patch", type=int, default=6, help="occlusion patch edge in voxels (default 6)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default=None, help="output folder (default: RUN/explain-<split>)")
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 2 with a one-line error (unknown method, CVAE method on a non-CVAE run, bad truth map)."""
    from brainage_hpc.interpret.explain import run_explain

    run_path = Path(args.run_dir)
    out = args.out or (run_path if run_path.is_dir() else run_path.parent) / f"explain-{args.split}"
    try:
        s = run_explain(args.run_dir, args.shards, out, methods=args.method, truth=None if args.truth == "none" else args.truth,
                        split=args.split, max_subjects=args.max_subjects, occlusion_subjects=args.occlusion_subjects,
                        curve_subjects=args.curve_subjects, patch=args.patch, batch_size=args.batch_size, device=args.device)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"brainage explain: error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 2
    for m, r in s["methods"].items():
        enr = f"enrichment {r['enrichment']:.2f}x, rho {r['spearman']:.2f}, " if "enrichment" in r else ""
        print(f"explain: {m}: {enr}deletion AOPC {r.get('aopc_deletion', float('nan')):.2f} y, "
              f"{r['n_zero_maps']}/{r['n_subjects']} zero maps, {r['seconds']:.0f} s")
    print(f"explain: -> {out}")
    return 0
