"""``brainage predict`` as a resumable cohort run: plan, score one task's share, merge.

One run = a plan (the scans owed, ``OUT.parts/plan.json``), K tasks that each append
to their own part file, and a merge into ``OUT`` (one row per scan, plan order).

* Single run (no ``--task-id``): the plan is made from the inputs each time (a rerun
  with more files extends it), task 0 of 1 scores what has no successful record yet,
  and the CSV is written at the end, also when the run was stopped (unscored scans
  are error rows that say so).
* Array task (``--task-id i --tasks K``, e.g. from ``slurm/predict_array.sh``): the
  first task to start writes the plan and the others use it; each scores its slice;
  the task that finds every planned scan recorded merges.

A rerun skips every scan with a successful record whose key (path, size, mtime)
matches the file now, in any part file of the folder; failed scans are tried again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainage_hpc.evaluation.cohort_run import ScoreOptions, ScoreOutcome, StopRequest, score_scans
from brainage_hpc.evaluation.exported import model_digest
from brainage_hpc.evaluation.merge import MergeSummary, collect_rows, merge_parts
from brainage_hpc.evaluation.parts import (
    PartWriter,
    Plan,
    iter_part_files,
    part_name,
    parts_dir_for,
    read_plan,
    read_records,
    write_plan,
)
from brainage_hpc.evaluation.scans import collect_scans, failure_message, scan_key
from brainage_hpc.outputs import check_output_file, prepare_output_dir

__all__ = ["PREEMPT_EXIT_CODE", "PredictRequest", "array_plan", "exit_code_for_signal", "load_for_scoring", "run_merge", "run_predict"]

PREEMPT_EXIT_CODE = 3  # contract 1: stopped by SIGUSR1, requeue wanted
_MAX_LISTED = 20


def exit_code_for_signal(signum: int) -> int:
    """Contract 1: SIGUSR1 -> 3 (requeue wanted); SIGTERM/SIGINT -> 128 + signum (do not requeue)."""
    import signal

    return PREEMPT_EXIT_CODE if signum == signal.SIGUSR1 else 128 + int(signum)


@dataclass(frozen=True)
class PredictRequest:
    """Everything one ``brainage predict`` process does.

    Attributes:
        checkpoint: run folder, ``model.pt``, ``.onnx`` or TorchScript export; a tuple of several
            runs (or a sweep folder): their ensemble.
        inputs: NIfTI files, folders, CSV/TSV tables.
        out: output CSV; None = print the results only (parts in a temporary folder).
        task, tasks: this process scores task ``task`` of ``tasks`` (None = a single run).
        options: batch size, workers, default sex, progress bar.
        device: torch device (default CUDA when available).
        report: write the cohort report next to ``out`` after the merge.
    """

    checkpoint: str | tuple[str, ...]
    inputs: tuple[str, ...]
    out: str | None = None
    task: int | None = None
    tasks: int = 1
    options: ScoreOptions = field(default_factory=ScoreOptions)
    device: str | None = None
    report: bool = True
    calibration: str | None = None


def _say(msg: str, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def _scored_keys(parts_dir: Path, model: str) -> set[tuple[str, int, int]]:
    """Keys of scans with a successful record of ``model`` in any part of the folder."""
    done: set[tuple[str, int, int]] = set()
    for _, _, path in iter_part_files(parts_dir):
        records, _ = read_records(path)
        for r in records:
            if r.get("kind") != "scan" or r.get("error") or r.get("model") != model:
                continue
            if isinstance(r.get("key"), list) and len(r["key"]) == 3:
                done.add((str(r["key"][0]), int(r["key"][1]), int(r["key"][2])))
    return done


def _current_key(path: str) -> tuple[str, int, int]:
    try:
        return scan_key(path)
    except OSError:
        return (os.path.abspath(path), -1, -1)


def array_plan(parts_dir: Path, inputs: Sequence[str], tasks: int, model: str) -> Plan:
    """The plan of a K-task array run: the one in ``parts_dir``, or a new one (first writer wins).

    Resubmitting the same array continues it; another task count or other inputs are refused.

    Raises:
        ValueError: ``tasks`` < 1, or the folder holds a plan for other inputs or another task count.
    """
    if tasks < 1:
        raise ValueError(f"--tasks must be >= 1, got {tasks}")
    plan = read_plan(parts_dir)
    if plan is None:
        scans, failures = collect_scans(inputs)
        plan = write_plan(parts_dir, Plan(scans, failures, tasks, list(inputs), model=model), replace=False)
    if plan.model and plan.model != model:
        raise ValueError(
            f"{parts_dir / 'plan.json'}: this run is scored with other weights (model {plan.model[:12]}, not "
            f"{model[:12]}); use another --out for another model"
        )
    if plan.tasks != tasks or (inputs and plan.inputs != list(inputs)):
        raise ValueError(
            f"{parts_dir / 'plan.json'}: holds a plan for {plan.tasks} task(s) over inputs {plan.inputs}, "
            f"not --tasks {tasks} over {list(inputs)}; use another --out, or delete that folder to start over"
        )
    return plan


def _plan_for(req: PredictRequest, parts_dir: Path, model: str) -> Plan:
    if req.task is None:
        scans, failures = collect_scans(req.inputs)
        return write_plan(parts_dir, Plan(scans, failures, 1, list(req.inputs), model=model), replace=True)
    return array_plan(parts_dir, req.inputs, req.tasks, model)


def _session(event: str, task: int, tasks: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "session", "event": event, "task": task, "tasks": tasks, "host": socket.gethostname(),
            "pid": os.getpid(), "time": round(time.time(), 3), **extra}


def _report_merge(summary: MergeSummary, out: Path | None, plan: Plan, say: Callable[..., None]) -> None:
    for failure in plan.failures:
        say(f"brainage predict: error: {failure_message(failure)}", True)
    for name, n in summary.missing_parts.items():
        say(f"brainage predict: part {name} is missing: {n} scan(s) not scored", True)
    for name, n in summary.incomplete_parts.items():
        say(f"brainage predict: part {name} has no record for {n} scan(s) (stopped or still running)", True)
    if summary.dropped_lines:
        say(f"brainage predict: warning: skipped {summary.dropped_lines} torn or damaged record line(s) in the parts", True)
    n = len(summary.rows)
    where = f" -> {out}" if out else ""
    say(f"brainage predict: {n} scan(s): {summary.n_ok} scored, {summary.n_failed} failed, "
        f"{summary.n_missing} not scored{where}", summary.n_failed + summary.n_missing > 0)


def _merge_locked(parts_dir: Path, plan: Plan, out: Path, report: bool, say: Callable[..., None]) -> MergeSummary:
    """Merge under ``merge.lock`` (two array tasks may finish together), then write the report."""
    with open(parts_dir / "merge.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = merge_parts(parts_dir, plan, out)
        if report:
            from brainage_hpc.evaluation.cohort_report import write_cohort_report

            try:
                md = write_cohort_report(out, summary, parts_dir)
                say(f"report: {md}")
            except OSError as exc:
                from brainage_hpc.outputs import describe_os_error

                say(f"brainage predict: warning: cohort report not written ({describe_os_error(exc)})", True)
    return summary


def load_for_scoring(checkpoint: str | Sequence[str], device: str | None,
                     calibration: str | None = None) -> tuple[Any, Any]:
    """The model (or ensemble) and its ``PreprocessConfig``, checked to fit each other.

    Raises:
        FileNotFoundError, ValueError: no such checkpoint, not a model, no preprocessing recorded.
    """
    from brainage_hpc.evaluation.ensemble import load_models
    from brainage_hpc.ingest.preprocess import PreprocessConfig

    lm = load_models([checkpoint] if isinstance(checkpoint, str) else list(checkpoint), device, calibration)
    if not lm.preprocess:
        raise ValueError(f"{lm.source}: the run recorded no preprocessing config; cannot prepare NIfTI files")
    pcfg = PreprocessConfig.from_dict(lm.preprocess)
    if tuple(pcfg.shape) != tuple(lm.shape):
        raise ValueError(f"{lm.source}: preprocessing shape {pcfg.shape} differs from the model's {lm.shape}")
    warn_fingerprint(lm)
    return lm, pcfg


def warn_fingerprint(lm: Any) -> list[str]:
    """One warning line when this environment would preprocess differently from training (contract 4).

    Scans are still scored (the difference is often harmless, e.g. a patch release), but
    the user learns it before trusting an age that a changed interpolation may have moved.
    """
    from brainage_hpc.ingest.fingerprint import fingerprint_differences

    diffs = fingerprint_differences(lm.fingerprint)
    if diffs:
        _say(f"brainage predict: warning: {lm.source}: preprocessing here differs from training: {'; '.join(diffs)}",
             True)
    return diffs


def scoring_key(lm: Any, options: ScoreOptions) -> str:
    """The weights' digest, plus the calibration's and --bias-correct when they add columns: records of
    another model or calibration are scored again, not reused. Every writer of a plan uses this key
    (``run_predict`` and ``launch predict``), so the array's tasks accept the plan it wrote."""
    import hashlib
    import json

    key = model_digest(lm.model)
    if lm.calibration is not None:
        cal = hashlib.sha256(json.dumps(lm.calibration, sort_keys=True).encode()).hexdigest()[:16]
        key += f"+cal:{cal}" + ("+bc" if options.bias_correct else "")
    return key


def run_predict(req: PredictRequest, say: Callable[..., None] = _say) -> int:
    """Plan, score this process's share, merge when due. Returns the exit code.

    Returns:
        0 all scans scored; 1 some failed or are not scored; 3 stopped by SIGUSR1 (requeue);
        128 + signum stopped by SIGTERM/SIGINT.

    Raises:
        OutputError: ``out`` cannot be written (a folder, read-only, under a file).
        FileNotFoundError, ValueError: bad checkpoint, plan mismatch (one line each).
    """
    if req.tasks < 1:
        raise ValueError(f"--tasks must be >= 1, got {req.tasks}")
    if req.task is not None and not 0 <= req.task < req.tasks:
        raise ValueError(f"--task-id {req.task} is outside 0..{req.tasks - 1} for --tasks {req.tasks}")
    out = check_output_file(req.out, "--out") if req.out else None
    lm, pcfg = load_for_scoring(req.checkpoint, req.device, req.calibration)
    if req.options.bias_correct and not (lm.calibration and "alpha" in lm.calibration.get("bias", {})):
        raise ValueError(f"{lm.source}: --bias-correct needs a calibration with a fitted bias correction "
                         "(run `brainage calibrate` first)")
    tmp = None
    if out is None:
        tmp = tempfile.mkdtemp(prefix="brainage-predict-")
        parts_dir = Path(tmp)
    else:
        parts_dir = prepare_output_dir(parts_dir_for(out), "parts folder")
    try:
        task = req.task or 0
        # the part's lock first: a second process on the same part stops before it touches the plan
        with PartWriter(parts_dir / part_name(task, req.tasks)) as writer, StopRequest() as stop:
            model = scoring_key(lm, req.options)
            plan = _plan_for(req, parts_dir, model)
            done = _scored_keys(parts_dir, model)
            todo = [(i, plan.scans[i]) for i in plan.task_range(task) if _current_key(plan.scans[i].path) not in done]
            skipped = len(plan.task_range(task)) - len(todo)
            if skipped:
                say(f"brainage predict: {skipped} scan(s) already scored, {len(todo)} to do", True)
            writer.append([_session("start", task, plan.tasks, todo=len(todo), skipped=skipped, device=str(lm.device),
                                    model=str(lm.source),
                                    workers=req.options.workers, batch_size=req.options.batch_size)])
            outcome: ScoreOutcome = score_scans(lm, pcfg, todo, writer, req.options, stop, task, model=model)
            writer.append([_session("end", task, plan.tasks, scored=outcome.scored, failed=outcome.failed,
                                    stopped_by=outcome.stopped_by, elapsed_s=round(outcome.elapsed_s, 3),
                                    prepare_s=round(outcome.prepare_s, 3), infer_s=round(outcome.infer_s, 3))])
        code = 1 if outcome.failed else 0
        if outcome.stopped_by is not None:
            code = exit_code_for_signal(outcome.stopped_by)
        if req.task is not None and outcome.stopped_by is None:
            summary = collect_rows(parts_dir, plan)
            if not summary.complete:
                say(f"brainage predict: task {task} of {plan.tasks} done ({outcome.scored} scored, {outcome.failed} "
                    f"failed); {summary.n_missing} scan(s) of other tasks not scored yet, merge later")
                return code
        if out is None:
            summary = collect_rows(parts_dir, plan)
            for row in summary.rows:
                if not row["error"]:
                    say(f"{row['file']}\t{row['pred_age']:.2f}")
        elif req.task is None or outcome.stopped_by is None:
            summary = _merge_locked(parts_dir, plan, out, req.report, say)
        else:
            return code
        _report_merge(summary, out, plan, say)
        if code == 0 and (summary.n_failed or summary.n_missing):
            code = 1
        return code
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run_merge(out: str, report: bool = True, say: Callable[..., None] = _say) -> int:
    """``brainage predict --merge --out OUT``: combine the parts of a run; 0 when every scan was scored, else 1."""
    out_path = check_output_file(out, "--out")
    parts_dir = parts_dir_for(out_path)
    plan = read_plan(parts_dir)
    if plan is None:
        raise FileNotFoundError(f"{parts_dir}: no plan.json; nothing to merge (run brainage predict with --out {out} first)")
    summary = _merge_locked(parts_dir, plan, out_path, report, say)
    _report_merge(summary, out_path, plan, say)
    return 0 if summary.n_failed + summary.n_missing == 0 else 1
