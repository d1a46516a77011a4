"""``brainage latent``: CVAE latent means of a split projected with PCA and t-SNE, coloured by age."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a cvae run folder (plain or DeepSpeed) or model.pt")
    parser.add_argument("--shards", required=True, help="shard folder written by `brainage preprocess`")
    parser.add_argument("--split", default="test", help="split to encode (default: test)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/latent-<split>)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="random state of t-SNE/UMAP")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 2 with a one-line error (not a cvae run, bad shards or split)."""
    from brainage_hpc.interpret.latent import run_latent

    run_path = Path(args.run_dir)
    out = args.out or (run_path if run_path.is_dir() else run_path.parent) / f"latent-{args.split}"
    try:
        summary = run_latent(args.run_dir, args.shards, out, args.split, args.batch_size, args.seed, args.device)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"brainage latent: error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 2
    print(f"latent: {summary['n']} subjects of '{args.split}' projected with {', '.join(summary['methods'])} -> {out}")
    return 0
