"""``brainage evaluate``: predictions.csv, metrics.json, plots and report.md for a trained run."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run folder (plain or DeepSpeed) or an exported model.pt")
    parser.add_argument("--shards", required=True, help="shard folder written by `brainage preprocess`")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/eval-<split>)")
    parser.add_argument("--batch-size", type=int, default=4, help="volumes per forward pass (default: 4)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 2 with a one-line error for a bad run, shard folder or split."""
    from brainage_hpc.evaluation.evaluate import evaluate_run

    try:
        metrics = evaluate_run(args.run_dir, args.shards, args.split, args.out, args.batch_size, args.device)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"brainage evaluate: error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 2
    cls = metrics["classification"]
    parts = [f"{k} micro-F1 {v['f1_micro']:.3f}" for k, v in cls.items()]
    if metrics.get("regression"):
        parts.append(f"MAE {metrics['regression']['mae']:.2f} y")
    if metrics.get("regression_bias_corrected"):
        parts.append(f"bias-corrected MAE {metrics['regression_bias_corrected']['mae']:.2f} y")
    print(f"evaluate: {metrics['n']} subjects of '{metrics['split']}': {', '.join(parts)}")
    return 0
