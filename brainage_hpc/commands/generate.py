"""``brainage generate``: CVAE brains at given ages (NIfTI + PNG), an age strip and a CSF readout."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a cvae run folder (plain or DeepSpeed) or model.pt")
    parser.add_argument("--age", type=float, nargs="+", required=True, help="age(s) in years")
    parser.add_argument("--sex", choices=["M", "F"], required=True)
    parser.add_argument("--n", type=int, default=4, help="samples per age (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="latent noise seed; sample k shares its noise across ages")
    parser.add_argument("--strip-steps", type=int, default=7, help="ages in age-strip.png (default: 7)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 2 with a one-line error (not a cvae run, bad arguments)."""
    from brainage_hpc.interpret.latent import run_generate

    if args.n < 1:
        print(f"brainage generate: error: --n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    try:
        summary = run_generate(args.run_dir, args.out, args.age, args.sex, args.n, args.seed, args.strip_steps, args.device)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"brainage generate: error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 2
    csf = summary["csf"]
    print(f"generate: {len(summary['files'])} volume(s) of shape {summary['shape']} -> {args.out}; CSF fraction "
          f"{csf['youngest_age']:g} y: {csf['youngest_mean']:.4f}, {csf['oldest_age']:g} y: {csf['oldest_mean']:.4f}")
    return 0
