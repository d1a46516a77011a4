"""``brainage predict``: brain age of every scan of a cohort, resumable, as one process or K array tasks.

    brainage predict --checkpoint RUN --input scans/ table.csv --out pred.csv        # all, resumable
    brainage predict ... --out pred.csv --tasks 4 --task-id $SLURM_ARRAY_TASK_ID     # one array task
    brainage predict --merge --out pred.csv                                          # combine the parts
"""

from __future__ import annotations

import argparse
import os

__all__ = ["add_arguments", "run"]


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", nargs="+",
                        help="run folder, model.pt, model.onnx or TorchScript export (not with --merge); several runs "
                             "or a sweep folder: their ensemble (mean age and an ensemble_sd column)")
    parser.add_argument("--calibration", default=None,
                        help="calibration.json to use (default: the run's or sweep folder's; `brainage calibrate` writes it)")
    parser.add_argument("--bias-correct", action="store_true",
                        help="add brain_age_corrected and brain_age_gap_corrected for scans whose age is given "
                             "(the calibration's linear bias correction, fitted on the validation split)")
    parser.add_argument("--input", nargs="+", default=[],
                        help="NIfTI files, folders (searched recursively) and/or CSV/TSV tables "
                             "(columns path, optional subject, session, age, sex, site, cohort, group)")
    parser.add_argument("--out", default=None,
                        help="CSV to write; records go to OUT.parts/ as they are scored, so a rerun resumes")
    parser.add_argument("--sex", choices=["M", "F", "unknown"], default="unknown",
                        help="sex of scans whose source gives none; unknown (default) averages the predictions for M and F")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="scans per forward pass (default 4)")
    parser.add_argument("--workers", type=int, default=_default_workers(),
                        help="preprocessing processes (default: CPUs - 1, at most 8; 0 = in the main process)")
    parser.add_argument("--tasks", type=int, default=None, help="split the cohort into this many array tasks")
    parser.add_argument("--task-id", type=int, default=None, help="the array task to run (0..tasks-1)")
    parser.add_argument("--merge", action="store_true", help="combine the part files of --out into the CSV and report")
    parser.add_argument("--no-report", action="store_true", help="do not write OUT_report.md/.png after the merge")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every scan was scored; 1 when some failed or are not scored (the CSV is written anyway);
    2 for a bad checkpoint, argument or output path; 3 stopped by SIGUSR1 (requeue); 128+N stopped by signal N."""
    from brainage_hpc.config import ConfigError
    from brainage_hpc.evaluation.cohort_predict import PredictRequest, run_merge, run_predict
    from brainage_hpc.evaluation.cohort_run import ScoreOptions

    if args.merge:
        if not args.out:
            raise ConfigError("--merge needs --out (the CSV whose OUT.parts/ folder to merge)")
        return run_merge(args.out, report=not args.no_report)
    if not args.checkpoint or not args.input:
        raise ConfigError("--checkpoint and --input are required (or use --merge --out CSV)")
    if (args.tasks is None) != (args.task_id is None):
        raise ConfigError("--tasks and --task-id go together (one array task of TASKS)")
    if args.tasks is not None and not args.out:
        raise ConfigError("array tasks need --out (their parts go to OUT.parts/)")
    try:
        options = ScoreOptions(batch_size=args.batch_size, workers=args.workers, sex=args.sex, progress=not args.no_progress,
                               bias_correct=args.bias_correct)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    request = PredictRequest(
        checkpoint=args.checkpoint[0] if len(args.checkpoint) == 1 else tuple(args.checkpoint),
        inputs=tuple(args.input),
        out=args.out,
        task=args.task_id,
        tasks=args.tasks if args.tasks is not None else 1,
        options=options,
        device=args.device,
        report=not args.no_report,
        calibration=args.calibration,
    )
    try:
        return run_predict(request)
    except ValueError as exc:  # bad checkpoint, damaged or mismatched plan: one line
        raise ConfigError(str(exc)) from None
