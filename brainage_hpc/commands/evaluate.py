"""``brainage evaluate``: predictions.csv, metrics.json, plots and report.md for a trained run."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", "--checkpoint", dest="run_dir", nargs="+", required=True,
                        help="run folder (plain or DeepSpeed) or an exported model.pt; several runs or a sweep "
                             "folder: their ensemble (mean age, members' spread, each member's MAE)")
    parser.add_argument("--calibration", default=None,
                        help="calibration.json to use (default: the run's, else fitted on the validation split)")
    parser.add_argument("--shards", required=True, help="shard folder written by `brainage preprocess`")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/eval-<split>)")
    parser.add_argument("--batch-size", type=int, default=4, help="volumes per forward pass (default: 4)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 2 with a one-line error for a bad run, shard folder or split."""
    from brainage_hpc.evaluation.evaluate import evaluate_run

    try:
        metrics = evaluate_run(args.run_dir, args.shards, args.split, args.out, args.batch_size, args.device,
                               args.calibration)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"brainage evaluate: error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 2
    cls = metrics["classification"]
    parts = [f"{k} micro-F1 {v['f1_micro']:.3f}" for k, v in cls.items()]
    if metrics.get("regression"):
        parts.append(f"MAE {metrics['regression']['mae']:.2f} y")
    if metrics.get("regression_bias_corrected"):
        parts.append(f"bias-corrected MAE {metrics['regression_bias_corrected']['mae']:.2f} y")
    trust = metrics.get("trust") or {}
    if trust.get("baseline"):
        parts.append(f"predict-the-mean MAE {trust['baseline']['mae']:.2f} y")
    if trust.get("intervals"):
        parts.append(f"90 % interval coverage {trust['intervals']['coverage']:.2f} "
                     f"(median width {trust['intervals']['median_width']:.1f} y)")
    if trust.get("ood"):
        parts.append(f"OOD flagged {trust['ood']['n_flagged']}/{trust['ood']['n']}")
    if trust.get("ensemble"):
        members = ", ".join(f"{v:.2f}" for v in trust["ensemble"]["members"].values())
        parts.append(f"members' MAE {members} y")
    print(f"evaluate: {metrics['n']} subjects of '{metrics['split']}': {', '.join(parts)}")
    return 0
