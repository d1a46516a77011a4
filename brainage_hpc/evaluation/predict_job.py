"""``python -m brainage_hpc.launch predict``: score a cohort as a SLURM job array through submitit.

    python -m brainage_hpc.launch predict --checkpoint checkpoints/sfcn --input /data/bids \\
        --out /scratch/$USER/pred.csv --tasks 16 --cpus-per-task 4 --time 60 --wait

The plan (which scans, split into K tasks) is written here, before submitting, so
every task and the merge agree on it. Each array task is a :class:`PredictTask`: it
scores its slice into its own part file (``brainage predict --task-id i --tasks K``)
and the task that completes the plan merges the parts into ``--out``. Submitting the
same command again continues where the parts stop (scored scans are skipped).

Signals (contract 1): SLURM's ``--signal=USR1@delay`` before the time limit, or a
preemption warning, stops the task between batches and requeues it through
submitit's own path (``checkpoint()`` returns a fresh task; state is the part file
on disk). SIGTERM (``scancel``) stops the task without requeueing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # read by submitit at import time

import submitit  # noqa: E402

from brainage_hpc.evaluation.cohort_predict import (  # noqa: E402
    PREEMPT_EXIT_CODE,
    PredictRequest,
    array_plan,
    load_for_scoring,
    run_merge,
    run_predict,
    scoring_key,
)
from brainage_hpc.evaluation.cohort_run import ScoreOptions  # noqa: E402

__all__ = ["PredictTask", "build_predict_executor", "main"]


class PredictTask(submitit.helpers.Checkpointable):
    """One array task: score task ``request.task`` of ``request.tasks``; requeue itself after SIGUSR1."""

    def __init__(self, request: PredictRequest) -> None:
        self.request = request

    def __call__(self) -> dict[str, Any]:
        code = run_predict(self.request)
        if code == PREEMPT_EXIT_CODE:
            _requeue_via_submitit()
            sys.exit(-1)  # like submitit's own handler: no result, the task comes back
        if code not in (0, 1):
            return {"task": self.request.task, "exit_code": code, "stopped": True}
        return {"task": self.request.task, "exit_code": code, "stopped": False}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """A fresh task with the same request: the part file on disk says what is left."""
        return submitit.helpers.DelayedSubmission(PredictTask(self.request))


def _requeue_via_submitit() -> None:
    """The path submitit takes for a caught preemption signal: checkpoint() -> pickle -> scontrol requeue -> exit."""
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission

    env = submitit.JobEnvironment()
    delayed = DelayedSubmission.load(env.paths.submitted_pickle)
    SignalHandler(env, env.paths, delayed).checkpoint_and_try_requeue(signal.SIGUSR1)


def build_predict_executor(args: argparse.Namespace, log_dir: Path) -> submitit.AutoExecutor:
    """AutoExecutor for K single-task array jobs with the resources of ``args``."""
    folder = str(log_dir / "%j")
    if args.executor == "local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    params: dict[str, Any] = {
        "name": args.job_name,
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.time,
    }
    if args.gpus_per_task:
        params["gpus_per_node"] = args.gpus_per_task
    if args.executor == "slurm":
        params["slurm_signal_delay_s"] = args.signal_delay_s
        params["slurm_array_parallelism"] = args.max_parallel
        extra: dict[str, Any] = {"requeue": True}
        if args.account:
            extra["account"] = args.account
        params["slurm_additional_parameters"] = extra
        if args.partition:
            params["slurm_partition"] = args.partition
        params["slurm_setup"] = ["export SUBMITIT_PREEMPT_SIGNAL=USR1", "export OMP_NUM_THREADS=1"]
    ex.update_parameters(**params)
    return ex


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m brainage_hpc.launch predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder, model.pt, .onnx or TorchScript export")
    p.add_argument("--input", nargs="+", required=True, help="NIfTI files, folders, CSV/TSV tables")
    p.add_argument("--out", required=True, help="merged CSV (parts in OUT.parts/, logs in OUT.parts/logs/)")
    p.add_argument("--tasks", type=int, default=4, help="array tasks (default 4)")
    p.add_argument("--max-parallel", type=int, default=50, help="array tasks running at once (default 50)")
    p.add_argument("--cpus-per-task", type=int, default=2, help="CPUs per task = preprocessing workers + 1 (default 2)")
    p.add_argument("--gpus-per-task", type=int, default=0)
    p.add_argument("--time", type=int, default=60, help="minutes per task; it requeues itself when they run out")
    p.add_argument("--signal-delay-s", type=int, default=120, help="USR1 this many seconds before the time limit")
    p.add_argument("--max-requeues", type=int, default=20)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="brainage-predict")
    p.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sex", choices=["M", "F", "unknown"], default="unknown")
    p.add_argument("--device", default=None)
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--wait", action="store_true", help="wait for every task, then print the merge summary")
    return p


def _slurm_state(job_id: str) -> str | None:
    """JobState from ``scontrol`` (works without slurmdbd, unlike sacct); None once the record is gone."""
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    states = [t.split("=", 1)[1] for t in out.stdout.split() if t.startswith("JobState=")]
    return states[0] if states else None


_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _wait(jobs: list[submitit.Job], executor: str, poll_s: float = 3.0) -> None:
    """Until every task has a result or has left the queue for 30 s (a scancel'ed task leaves no result)."""
    gone: dict[str, float] = {}
    while True:
        pending = []
        for job in jobs:
            if job.paths.result_pickle.exists():  # not job.done(): it asks sacct, which needs slurmdbd
                continue
            state = _slurm_state(job.job_id) if executor == "slurm" else "RUNNING"
            if state is None or state in _ENDED:
                gone.setdefault(job.job_id, time.time())
                if time.time() - gone[job.job_id] > 30:
                    continue
            else:
                gone.pop(job.job_id, None)
            pending.append(job)
        if not pending:
            return
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    """Plan, submit the array, optionally wait and merge. Exit 0 submitted (or all scored), 1 failures, 2 bad arguments."""
    args = _parser().parse_args(argv)
    from brainage_hpc.evaluation.parts import parts_dir_for
    from brainage_hpc.outputs import check_output_file, prepare_output_dir

    try:
        if args.tasks < 1 or args.cpus_per_task < 1 or args.max_parallel < 1:
            raise ValueError("--tasks, --cpus-per-task and --max-parallel must be >= 1")
        out = check_output_file(args.out, "--out").resolve()
        parts_dir = prepare_output_dir(parts_dir_for(out), "parts folder")
        inputs = tuple(str(Path(i).resolve()) for i in args.input)  # tasks may start in another folder
        lm, _ = load_for_scoring(args.checkpoint, "cpu")  # a bad checkpoint fails here, not in K tasks
        options = ScoreOptions(batch_size=args.batch_size, workers=max(args.cpus_per_task - 1, 0), sex=args.sex,
                               progress=True)
        plan = array_plan(parts_dir, inputs, args.tasks, scoring_key(lm, options))
    except (ValueError, OSError) as exc:
        print(f"launch predict: error: {exc}", file=sys.stderr)
        return 2
    base = PredictRequest(checkpoint=str(Path(args.checkpoint).resolve()), inputs=inputs, out=str(out), task=0,
                          tasks=plan.tasks, options=options, device=args.device, report=not args.no_report)
    ex = build_predict_executor(args, parts_dir / "logs")
    with ex.batch():
        jobs = [ex.submit(PredictTask(replace(base, task=task))) for task in range(plan.tasks)]
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted array {array_id}: {plan.tasks} task(s) over {len(plan.scans)} scan(s) ({args.executor})")
    print(f"  parts: {parts_dir}")
    print(f"  logs:  {parts_dir / 'logs'}")
    print(f"  merge: brainage predict --merge --out {out}   (automatic when the last task finishes)")
    if not args.wait:
        return 0
    _wait(jobs, args.executor)
    return run_merge(str(out), report=not args.no_report)
