"""``brainage export``: a run's checkpoint (plain or DeepSpeed ZeRO) -> one inference file."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run folder written by `brainage train`")
    parser.add_argument("--which", choices=["best", "last"], default="best")
    parser.add_argument("--out", default=None, help="output file (default: RUN_DIR/model.pt)")


def run(args: argparse.Namespace) -> int:
    from brainage_hpc.engine.checkpoint import export_state_dict
    from brainage_hpc.outputs import check_output_file

    out = check_output_file(args.out, "--out") if args.out else None
    path = export_state_dict(args.run_dir, out, which=args.which)
    print(f"wrote {path}")
    return 0
