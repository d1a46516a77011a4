"""Requeue only while restarts make progress.

A job whose ``--time`` is shorter than its ``--signal`` lead gets USR1 as soon as
it starts, checkpoints nothing and requeues itself forever (issue 14). Each job
start records the newest checkpointed step; each requeue request compares it
with the newest step now. A restart that saved no newer checkpoint is *stalled*;
after ``max_stalled`` stalled restarts in a row the job is not requeued again and
the reason is printed (and kept in ``<run_dir>/requeue_state.json``).

Used by the submitit job (:class:`brainage_hpc.launch.TrainJob`) and by the
sbatch scripts through the command line::

    python -m brainage_hpc.launching.requeue start RUN_DIR     # at every job start
    python -m brainage_hpc.launching.requeue check RUN_DIR --max-stalled 3   # exit 0: requeue
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainage_hpc.launching.runstate import checkpointed_step

__all__ = ["RequeueDecision", "STATE_FILE", "decide_requeue", "job_is_running", "main", "record_start"]

STATE_FILE = "requeue_state.json"


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    message: str


def _load(run_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: start counting afresh


def _save(run_dir: Path, state: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, run_dir / STATE_FILE)


def _restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def record_start(run_dir: str | Path, restart_count: int | None = None) -> dict[str, Any]:
    """Note the newest checkpointed step as this job instance starts.

    A fresh submission (restart count 0) resets the stall counter: resubmitting
    after fixing ``--time`` must not inherit the old count.
    """
    run_dir = Path(run_dir)
    restarts = _restart_count() if restart_count is None else restart_count
    state = _load(run_dir)
    state.update(
        start_step=checkpointed_step(run_dir),
        restart=restarts,
        stalled=int(state.get("stalled", 0)) if restarts > 0 else 0,
        job_id=os.environ.get("SLURM_JOB_ID", ""),
    )
    state.pop("message", None)
    _save(run_dir, state)
    return state


def decide_requeue(run_dir: str | Path, max_stalled: int) -> RequeueDecision:
    """Requeue if this instance saved a newer checkpoint, or fewer than ``max_stalled`` did not."""
    run_dir = Path(run_dir)
    state = _load(run_dir)
    start = int(state.get("start_step", 0))
    now = checkpointed_step(run_dir)
    if now > start:
        state["stalled"] = 0
        decision = RequeueDecision(True, f"requeue: checkpointed step {now} (this restart began at step {start})")
    else:
        state["stalled"] = stalled = int(state.get("stalled", 0)) + 1
        if stalled <= max_stalled:
            decision = RequeueDecision(
                True, f"requeue: no checkpoint after step {now} in this restart ({stalled} of {max_stalled} allowed in a row)"
            )
        else:
            decision = RequeueDecision(
                False,
                f"not requeueing: {stalled} restarts in a row saved no checkpoint after step {now} "
                f"(limit {max_stalled}). The time limit probably leaves no room before the checkpoint signal: "
                f"raise --time or lower the signal lead (sbatch --signal=B:USR1@SECONDS, launch.signal_delay_s), "
                f"then resubmit the same command to continue from step {now}.",
            )
    state["message"] = decision.message
    _save(run_dir, state)
    return decision


def job_is_running(job_id: str | None = None) -> bool:
    """False when SLURM is ending the job (scancel, time limit): never requeue those.

    A USR1 from ``--signal`` arrives while the job is RUNNING; ``scancel`` turns it
    COMPLETING/CANCELLED first. If ``scontrol`` cannot answer, assume running.
    """
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return True
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    for token in out.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1] == "RUNNING"
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m brainage_hpc.launching.requeue", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "check"])
    p.add_argument("run_dir")
    p.add_argument("--max-stalled", type=int, default=3, help="restarts in a row without a new checkpoint (default 3)")
    args = p.parse_args(argv)
    try:
        if args.action == "start":
            state = record_start(args.run_dir)
            print(f"restart {state['restart']}: newest checkpoint at step {state['start_step']}")
            return 0
        if not job_is_running():
            print("not requeueing: SLURM is ending this job (scancel or the time limit)")
            return 1
        decision = decide_requeue(args.run_dir, args.max_stalled)
    except OSError as exc:
        print(f"requeue guard: cannot use {args.run_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 0 if args.action == "check" else 1  # an unwritable state file must not lose a requeue
    print(decision.message)
    return 0 if decision.requeue else 1


if __name__ == "__main__":
    sys.exit(main())
