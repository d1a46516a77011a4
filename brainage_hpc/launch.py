"""Submit a training run, or a sweep as one job array, to SLURM (or run it locally) with submitit.

    python -m brainage_hpc.launch --config cvae_demo --nodes 4 --executor slurm \\
        --run-dir checkpoints/cvae4 --wait train.epochs=2
    python -m brainage_hpc.launch --config cnn_hcp --sweep train.lr=1e-3,3e-4 \\
        --sweep train.seed=0,1 --max-parallel 2 --run-dir checkpoints/lr-seed --wait

One task per GPU (one per node on CPU); rank and master come from
``submitit.helpers.TorchDistributedEnvironment``. Signals (contract 1):
SLURM sends SIGUSR1 ``launch.signal_delay_s`` seconds before the time limit;
every rank's trainer sets a flag, rank 0 checkpoints at the next step boundary,
the trainer exits 3 and the job requeues itself through submitit's own path
(``checkpoint()`` returns a fresh :class:`TrainJob` that resumes with
``--resume auto``), unless restarts stop making progress. ``scancel`` (SIGTERM)
checkpoints and ends the job: it is never requeued. Run it again with the same
command (same ``--run-dir``, or the default ``checkpoints/<config name>``) to
continue. The model is never pickled: state goes through the checkpoint on disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

# submitit reads the preemption signal at import time; USR1 is what our
# sbatch scripts and trainer use (NCCL does not catch it on recent versions).
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

import submitit  # noqa: E402

from brainage_hpc.config import ConfigError, RunConfig, config_from_dict, config_to_dict, load_config  # noqa: E402
from brainage_hpc.launching import requeue  # noqa: E402
from brainage_hpc.launching.executor import build_executor, dry_run_script, parse_mem_gb, time_limit_warning  # noqa: E402
from brainage_hpc.launching.sweep import SweepPoint, expand_grid, load_sweep_file, parse_sweep_arg, write_sweep  # noqa: E402
from brainage_hpc.launching.waiting import JobOutcome, wait_for_jobs  # noqa: E402
from brainage_hpc.outputs import OutputError, prepare_output_dir  # noqa: E402

__all__ = ["ERROR_FILE", "TrainJob", "build_executor", "main"]

log = logging.getLogger(__name__)
ERROR_FILE = "launch_error.txt"  # in the run folder when a job ended with an error (read by sweep-summary)


class TrainJob(submitit.helpers.Checkpointable):
    """A submitit callable that trains, and requeues itself after SIGUSR1 while it makes progress."""

    def __init__(self, cfg: dict[str, Any], run_dir: str, resume: str = "auto") -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume

    def __call__(self) -> dict[str, Any]:
        from brainage_hpc.engine.distributed import DistEnv, _resolvable
        from brainage_hpc.engine.run import train_main
        from brainage_hpc.engine.trainer import PREEMPT_EXIT_CODE

        tde = submitit.helpers.TorchDistributedEnvironment()
        env = DistEnv(
            rank=tde.rank,
            local_rank=tde.local_rank,
            world_size=tde.world_size,
            master_addr=_resolvable(tde.master_addr),
            master_port=tde.master_port,
            source="slurm",
        )
        run_dir = Path(self.run_dir)
        if env.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ERROR_FILE).unlink(missing_ok=True)
            requeue.record_start(run_dir)
        try:
            cfg = config_from_dict(self.cfg, source=f"{self.run_dir}/config.yaml")
            code = train_main(cfg, self.run_dir, resume=self.resume, env=env)
        except Exception as exc:
            self._record_error(env.rank, f"{exc.__class__.__name__}: {exc}")
            raise
        _shutdown_process_group()
        if code == 0:
            return {"run_dir": self.run_dir, "rank": env.rank, "world_size": env.world_size}
        if code == PREEMPT_EXIT_CODE:
            if env.rank == 0:
                self._requeue_via_submitit()  # exits; raises when the guard refuses
            sys.exit(-1)  # like submitit's own handler: no result, the job comes back
        if code > 128:
            name = _signal_name(code - 128)
            message = (f"training in {self.run_dir} stopped by {name} (exit {code}) after checkpointing; not requeued. "
                       f"Run the same launch command again to continue.")
        else:
            message = f"training in {self.run_dir} ended with exit code {code} (see {self.run_dir}/train.log)"
        self._record_error(env.rank, message)
        raise RuntimeError(message)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:  # type: ignore[override]
        """A fresh job that resumes from the newest checkpoint on disk, or None (no requeue).

        None when SLURM is ending the job (``scancel``: only the USR1 warning may
        requeue) or when restarts keep saving no new checkpoint. submitit reads None as
        "do not requeue" (its base class declares no None, hence the type: ignore).
        """
        if not requeue.job_is_running():
            self._refuse("not requeueing: SLURM is ending this job (scancel or the time limit)")
            return None
        max_stalled = int((self.cfg.get("launch") or {}).get("max_stalled_requeues", 3))
        decision = requeue.decide_requeue(self.run_dir, max_stalled)
        if not decision.requeue:
            self._refuse(decision.message)
            return None
        log.warning("%s", decision.message)
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.run_dir, "auto"))

    def _refuse(self, message: str) -> None:
        log.error("%s", message)
        self._record_error(0, message)

    def _record_error(self, rank: int, message: str) -> None:
        if rank != 0:
            return
        try:
            (Path(self.run_dir) / ERROR_FILE).write_text(message.strip().splitlines()[-1] + "\n" if message.strip() else "error\n")
        except OSError:
            pass  # the job's own error report is what matters; this file only helps sweep-summary

    @staticmethod
    def _requeue_via_submitit() -> None:
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        env = submitit.JobEnvironment()
        delayed = DelayedSubmission.load(env.paths.submitted_pickle)
        # Same path as a signal caught by submitit: checkpoint() -> pickle -> scontrol requeue -> exit.
        SignalHandler(env, env.paths, delayed).checkpoint_and_try_requeue(signal.SIGUSR1)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _shutdown_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as exc:  # a dead peer must not hide the training result
            log.warning("process group shutdown: %s", exc)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m brainage_hpc.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file or built-in name")
    p.add_argument("--run-dir", help="run folder (a sweep: the folder of its runs); default checkpoints/<config name>[-sweep]")
    p.add_argument("--resume", default="auto", help="auto | none | PATH")
    p.add_argument("--executor", choices=["slurm", "local"])
    p.add_argument("--dry-run", action="store_true", help="print the grid (sweeps) and the sbatch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="follow the job(s) with a progress line and exit with their status")
    r = p.add_argument_group("resources (sbatch options of the same name)")
    r.add_argument("--nodes", type=int)
    r.add_argument("--gpus-per-node", type=int)
    r.add_argument("--tasks-per-node", type=int, help="default: one per GPU, or one per node on CPU")
    r.add_argument("--cpus-per-task", type=int)
    r.add_argument("--mem", help="memory per node, e.g. 64G or 500M")
    r.add_argument("--time", type=int, dest="time_min", help="wall time in minutes (the job requeues itself near the end)")
    r.add_argument("--partition")
    r.add_argument("--account")
    r.add_argument("--qos", help="quality of service")
    r.add_argument("--constraint", help="node features, e.g. 'a100&ib'")
    r.add_argument("--exclude", help="nodes to avoid, e.g. 'gpu[03-04]'")
    r.add_argument("--mail-type", help="e.g. END,FAIL")
    r.add_argument("--mail-user")
    s = p.add_argument_group("sweeps (one SLURM job array, one run folder per point)")
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis of the grid; repeat for more axes (train.lr=1e-3,3e-4)")
    s.add_argument("--sweep-file", help="YAML mapping KEY: [values] (combined with --sweep)")
    s.add_argument("--max-parallel", "--array-parallelism", type=int, dest="array_parallelism",
                   help="array tasks running at once (the array's %%N)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, applied to every run")
    return p


def _launch_overrides(args: argparse.Namespace) -> list[str]:
    values: dict[str, Any] = {
        "nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "tasks_per_node": args.tasks_per_node,
        "cpus_per_task": args.cpus_per_task, "partition": args.partition, "account": args.account,
        "time_min": args.time_min, "executor": args.executor, "qos": args.qos, "constraint": args.constraint,
        "exclude": args.exclude, "mail_type": args.mail_type, "mail_user": args.mail_user,
        "array_parallelism": args.array_parallelism,
    }
    if args.mem is not None:
        values["mem_gb"] = parse_mem_gb(args.mem)
    # json-quoted strings survive YAML typing (exclude=n[1-2] is not a list)
    return [f"launch.{k}={_yaml_text(v)}" for k, v in values.items() if v is not None]


def _yaml_text(value: Any) -> str:
    import json

    return json.dumps(value) if isinstance(value, str) else str(value)


def _grid(args: argparse.Namespace) -> list[SweepPoint]:
    axes = load_sweep_file(args.sweep_file) if args.sweep_file else []
    axes += [parse_sweep_arg(text) for text in args.sweep]
    return expand_grid(axes) if axes else []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:  # cohort scoring array: evaluation/predict_job.py
        from brainage_hpc.evaluation.predict_job import main as predict_main

        return predict_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        base = list(args.overrides) + _launch_overrides(args)
        cfg = load_config(args.config, base)
        points = _grid(args)
        # every point's config is built now: a bad value fails here, not in task 7 of 9
        point_cfgs = [load_config(args.config, base + list(p.overrides)) for p in points]
    except (ConfigError, FileNotFoundError) as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2
    warning = time_limit_warning(cfg.launch)
    if warning:
        print(f"launch: warning: {warning}", file=sys.stderr)
    try:
        if points:
            return _run_sweep(args, cfg, points, point_cfgs, base)
        return _run_single(args, cfg)
    except OutputError as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2


def _run_single(args: argparse.Namespace, cfg: RunConfig) -> int:
    run_dir = Path(args.run_dir or f"checkpoints/{cfg.name}").resolve()
    folder = run_dir / "submitit" / "%j"
    if args.dry_run:
        print(dry_run_script(cfg, folder))
        return 0
    prepare_output_dir(run_dir, "run folder")
    ex = build_executor(cfg, folder, cfg.launch.executor)
    job = ex.submit(TrainJob(config_to_dict(cfg), str(run_dir), args.resume))
    print(f"submitted job {job.job_id} ({cfg.launch.executor}, {cfg.launch.nodes} node(s))")
    print(f"  logs:        {job.paths.stdout}  {job.paths.stderr}")
    print(f"  run dir:     {run_dir}")
    print(f"  tensorboard: tensorboard --logdir {run_dir / 'tb'}", flush=True)
    if not args.wait:
        return 0
    (outcome,) = wait_for_jobs([job], [run_dir], cfg.launch.executor)
    if outcome.error is not None:
        _print_failure(outcome)
        return 1
    print(f"job {job.job_id} finished: {outcome.results[0] if outcome.results else ''}")
    return 0


def _run_sweep(args: argparse.Namespace, cfg: RunConfig, points: list[SweepPoint], point_cfgs: list[RunConfig],
               base: list[str]) -> int:
    from brainage_hpc.launching.summary import write_summary

    sweep_dir = Path(args.run_dir or f"checkpoints/{cfg.name}-sweep").resolve()
    folder = sweep_dir / "submitit" / "%j"
    run_dirs = [sweep_dir / p.name for p in points]
    if args.dry_run:
        print(f"sweep: {len(points)} runs in {sweep_dir}")
        for p in points:
            print(f"  [{p.index}] {p.name}: {' '.join(p.overrides)}")
        print(dry_run_script(cfg, folder, array_size=len(points)))
        return 0
    prepare_output_dir(sweep_dir, "sweep folder")
    ex = build_executor(cfg, folder, cfg.launch.executor)
    # submit_array: different Checkpointable callables, one SLURM array (one job with one point)
    jobs = ex.submit_array([TrainJob(config_to_dict(c), str(d), args.resume) for c, d in zip(point_cfgs, run_dirs)])
    array_id = jobs[0].job_id.split("_")[0] if jobs else "?"
    write_sweep(sweep_dir, points, base, args.config, array_id)
    print(f"submitted job {array_id}: array of {len(points)} runs ({cfg.launch.executor})")
    for p, job, run_dir in zip(points, jobs, run_dirs):
        print(f"  {job.job_id}  {run_dir}")
    print(f"  tensorboard: tensorboard --logdir {sweep_dir}")
    print(f"  summary:     brainage sweep-summary {sweep_dir}", flush=True)
    if not args.wait:
        return 0
    outcomes = wait_for_jobs(jobs, run_dirs, cfg.launch.executor)
    for outcome in outcomes:
        if outcome.error is not None:
            _print_failure(outcome)
    files = write_summary(sweep_dir)
    print(files.table)
    print(f"summary: {files.csv} {files.markdown}")
    failed = sum(o.error is not None for o in outcomes)
    print(f"sweep {array_id}: {len(outcomes) - failed} of {len(outcomes)} runs finished")
    return 1 if failed else 0


def _print_failure(outcome: JobOutcome) -> None:
    text = (outcome.error or "").splitlines()
    print(f"launch: job {outcome.job.job_id} failed: {text[-1] if text else 'no result'}", file=sys.stderr)
    if len(text) > 1:
        print("\n".join(text[-25:]), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
