"""``brainage predict``: brain age of raw T1w NIfTI files with a trained run's preprocessing."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder (plain or DeepSpeed) or model/checkpoint file")
    parser.add_argument("--input", nargs="+", required=True, help="NIfTI files and/or folders (searched recursively)")
    parser.add_argument("--out", default=None, help="CSV to write (file, pred_age, classes, probabilities, error)")
    parser.add_argument("--sex", choices=["M", "F", "unknown"], default="unknown",
                        help="sex of every input; unknown (default) averages the predictions for M and F")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every file was predicted, 1 when some failed (each named on stderr), 2 for a bad checkpoint."""
    from brainage_hpc.evaluation.predict import find_nifti, load_model, predict_files
    from brainage_hpc.report import write_csv

    try:
        lm = load_model(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"brainage predict: error: {exc}", file=sys.stderr)
        return 2
    files, missing = find_nifti(args.input)
    try:
        results = missing + predict_files(lm, files, sex=args.sex)
    except ValueError as exc:
        print(f"brainage predict: error: {exc}", file=sys.stderr)
        return 2
    k = max((len(r.probs) for r in results), default=0)
    rows = []
    for r in results:
        if r.error:
            print(f"brainage predict: error: {r.error}", file=sys.stderr)
        else:
            print(f"{r.file}\t{r.pred_age:.2f}")
        probs = r.probs + [None] * (k - len(r.probs))
        rows.append([r.file, r.pred_age, r.bin4_pred, r.class2_pred, *probs, r.error])
    if args.out:
        header = ["file", "pred_age", "age_bin_pred", "class2_pred", *[f"prob_{i}" for i in range(k)], "error"]
        write_csv(args.out, header, rows)
    failed = sum(1 for r in results if r.error)
    if failed:
        print(f"brainage predict: {failed} of {len(results)} input(s) failed", file=sys.stderr)
        return 1
    return 0
