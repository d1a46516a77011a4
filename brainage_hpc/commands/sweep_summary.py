"""``brainage sweep-summary RUNS_DIR``: one table of a sweep's runs (CSV + markdown).

Each row: the run's overrides, best value of the monitored metric (``train.monitor``)
and the step it was reached, steps done of planned, and the status (finished,
unfinished, failed, not started). Sorted best first.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs_dir", help="sweep folder (one run folder per point, as written by the launcher's --sweep)")
    parser.add_argument("--out", help="folder for sweep_summary.csv/.md (default: RUNS_DIR)")


def run(args: argparse.Namespace) -> int:
    """Print the markdown table; exit 0 when every run finished, 1 when any failed or is unfinished."""
    from pathlib import Path

    from brainage_hpc.launching.summary import write_summary
    from brainage_hpc.outputs import prepare_output_dir

    if not Path(args.runs_dir).is_dir():
        raise FileNotFoundError(f"{args.runs_dir}: no such folder (expected a sweep folder with one run folder per point)")
    out = prepare_output_dir(args.out or args.runs_dir, "summary folder")
    files = write_summary(args.runs_dir, out)
    if not files.rows:
        print(f"brainage sweep-summary: no run folders under {args.runs_dir}")
        return 1
    print(files.table)
    print(f"sweep-summary: {len(files.rows)} runs -> {files.csv} {files.markdown}")
    return 0 if all(r.status.status == "finished" for r in files.rows) else 1
