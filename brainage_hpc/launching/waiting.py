"""``launch --wait``: follow jobs to their results with one short progress line per change.

submitit learns job states from ``sacct``; without slurmdbd every call fails and
submitit logs "Bypassing sacct error" again and again. Here results are found by
their result files and states come from ``scontrol``, so sacct is never asked;
the few warnings submitit might still emit are turned into debug messages.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import submitit

from brainage_hpc.launching.runstate import run_status

__all__ = ["FINAL_FAILED", "JobOutcome", "quiet_sacct_warnings", "slurm_state", "wait_for_jobs"]

FINAL_FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
_GONE_GRACE_S = 30.0  # result files land within seconds of a job's end


class _SacctNoise(logging.Filter):
    """Without slurmdbd every sacct call fails: one debug line instead of a warning per poll."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("submitit").isEnabledFor(logging.DEBUG)
        return True


def quiet_sacct_warnings() -> None:
    log = logging.getLogger("submitit")
    if not any(isinstance(f, _SacctNoise) for f in log.filters):
        log.addFilter(_SacctNoise())


def slurm_state(job_id: str) -> str | None:
    """JobState from ``scontrol`` (works without slurmdbd); None once the record is purged.

    An array's parent id answers one line per task; the first state is returned.
    """
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for token in out.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return None


@dataclass
class JobOutcome:
    """One job's end: ``results`` (one per task) or the error text."""

    job: submitit.Job
    run_dir: Path
    results: list[Any] | None = None
    error: str | None = None


def _has_results(job: submitit.Job) -> bool:
    return all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))


def _collect(job: submitit.Job, run_dir: Path) -> JobOutcome:
    try:
        return JobOutcome(job, run_dir, results=job.results())
    except Exception as exc:  # submitit re-raises the job's exception as text
        return JobOutcome(job, run_dir, error=str(exc).strip())


def wait_for_jobs(
    jobs: list[submitit.Job], run_dirs: list[Path], executor: str, poll_s: float = 3.0,
    progress_every_s: float = 30.0, out: TextIO = sys.stdout,
) -> list[JobOutcome]:
    """Wait until every job has a result or has ended without one; print progress as it changes.

    Progress comes from each run's ``metrics.jsonl`` (``job 123 RUNNING step 12/40``, at
    most every ``progress_every_s`` and at every state change); the state from ``scontrol``.
    A job that SLURM ended without a result file (cancelled, killed, node failure) is
    reported with its state and stderr path instead of hanging.
    """
    quiet_sacct_warnings()
    pending = dict(enumerate(jobs))
    outcomes: dict[int, JobOutcome] = {}
    shown: dict[int, tuple[str, str, float]] = {}
    gone_since: dict[int, float] = {}
    while pending:
        for i, job in list(pending.items()):
            if executor == "local":
                finished = job.done()  # no sacct for the local executor
            else:
                finished = _has_results(job)
            state = None if executor == "local" or finished else slurm_state(job.job_id)
            shown_state = state or ("DONE" if finished else "RUNNING")
            line = f"job {job.job_id} {shown_state} {run_status(run_dirs[i]).progress_text()}"
            last_state, last_line, last_time = shown.get(i, ("", "", 0.0))
            # a new state at once; a new step at most every progress_every_s
            if shown_state != last_state or (line != last_line and time.monotonic() - last_time >= progress_every_s):
                shown[i] = (shown_state, line, time.monotonic())
                print(line, file=out, flush=True)
            if finished:
                outcomes[i] = _collect(job, run_dirs[i])
                del pending[i]
                continue
            if executor == "slurm" and (state is None or state in FINAL_FAILED or state == "COMPLETED"):
                first = gone_since.setdefault(i, time.monotonic())
                if time.monotonic() - first > _GONE_GRACE_S and not _has_results(job):
                    outcomes[i] = JobOutcome(
                        job, run_dirs[i], error=f"job {job.job_id} ended {state or '(purged)'} without a result; see {job.paths.stderr}"
                    )
                    del pending[i]
            else:
                gone_since.pop(i, None)
        if pending:
            time.sleep(poll_s)
    return [outcomes[i] for i in range(len(jobs))]
