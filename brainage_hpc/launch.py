"""Submit a training run to SLURM (or run it locally) with submitit.

    python -m brainage_hpc.launch --config cvae_demo --nodes 4 --executor slurm \\
        --run-dir checkpoints/cvae4 --wait train.epochs=2

One task per GPU (one per node on CPU); rank and master come from
``submitit.helpers.TorchDistributedEnvironment``. Preemption: SLURM sends
SIGUSR1 ``launch.signal_delay_s`` seconds before the end; every rank's trainer
sets a flag, all ranks agree at the next step boundary, rank 0 checkpoints,
and the job requeues itself through submitit's own path (``checkpoint()``
returns a fresh :class:`TrainJob` that resumes with ``--resume auto``).
The model is never pickled: state goes through the checkpoint on disk.
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

__all__ = ["TrainJob", "build_executor", "main"]

log = logging.getLogger(__name__)


class TrainJob(submitit.helpers.Checkpointable):
    """A submitit callable that trains, and requeues itself on preemption."""

    def __init__(self, cfg: dict[str, Any], run_dir: str, resume: str = "auto") -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume

    def __call__(self) -> dict[str, Any]:
        from brainage_hpc.engine.distributed import DistEnv
        from brainage_hpc.engine.run import train_main
        from brainage_hpc.engine.trainer import PREEMPT_EXIT_CODE

        tde = submitit.helpers.TorchDistributedEnvironment()
        from brainage_hpc.engine.distributed import _resolvable

        env = DistEnv(
            rank=tde.rank,
            local_rank=tde.local_rank,
            world_size=tde.world_size,
            master_addr=_resolvable(tde.master_addr),
            master_port=tde.master_port,
            source="slurm",
        )
        cfg = config_from_dict(self.cfg, source=f"{self.run_dir}/config.yaml")
        code = train_main(cfg, self.run_dir, resume=self.resume, env=env)
        _shutdown_process_group()
        if code == PREEMPT_EXIT_CODE:
            if env.rank == 0:
                self._requeue_via_submitit()
            sys.exit(-1)  # like submitit's own handler: no result, the job comes back
        if code != 0:
            raise RuntimeError(f"training in {self.run_dir} ended with exit code {code} (see {self.run_dir}/train.log)")
        return {"run_dir": self.run_dir, "rank": env.rank, "world_size": env.world_size}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Resubmit a fresh job that resumes from the newest checkpoint on disk."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.run_dir, "auto"))

    @staticmethod
    def _requeue_via_submitit() -> None:
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        env = submitit.JobEnvironment()
        delayed = DelayedSubmission.load(env.paths.submitted_pickle)
        # Same path as a signal caught by submitit: checkpoint() -> pickle -> scontrol requeue -> exit.
        SignalHandler(env, env.paths, delayed).checkpoint_and_try_requeue(signal.SIGUSR1)


def _shutdown_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as exc:  # a dead peer must not hide the training result
            log.warning("process group shutdown: %s", exc)


def build_executor(cfg: RunConfig, run_dir: Path, executor: str) -> submitit.AutoExecutor:
    """AutoExecutor with the resources of ``cfg.launch`` (one task per GPU, or per node on CPU)."""
    lc = cfg.launch
    tasks = lc.tasks_per_node or max(lc.gpus_per_node, 1)
    folder = str(run_dir / "submitit" / "%j")
    if executor == "local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=lc.max_requeues)
    params: dict[str, Any] = {
        "name": cfg.name,
        "nodes": lc.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": lc.cpus_per_task,
        "timeout_min": lc.time_min,
    }
    if lc.gpus_per_node:
        params["gpus_per_node"] = lc.gpus_per_node
    if lc.mem_gb:
        params["mem_gb"] = lc.mem_gb
    if executor == "slurm":
        params["slurm_signal_delay_s"] = lc.signal_delay_s
        extra = {"requeue": True, **lc.slurm_additional}
        if lc.account:
            extra["account"] = lc.account
        params["slurm_additional_parameters"] = extra
        if lc.partition:
            params["slurm_partition"] = lc.partition
        params["slurm_setup"] = [
            "export SUBMITIT_PREEMPT_SIGNAL=USR1",
            f"export TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR', str(Path.home() / '.cache/torch_extensions'))}",
            "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        ]
    elif lc.nodes != 1:
        raise ConfigError(f"--executor local runs on this machine only: --nodes must be 1, got {lc.nodes}")
    ex.update_parameters(**params)
    return ex


def _dry_run_script(cfg: RunConfig, run_dir: Path) -> str:
    from submitit.slurm.slurm import SlurmExecutor

    ex = build_executor(cfg, run_dir, "slurm")
    inner: SlurmExecutor = ex._executor  # type: ignore[assignment]
    return inner._make_submission_file_text(inner._submitit_command_str, "DRYRUN")


_FINAL_FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _slurm_state(job_id: str) -> str | None:
    """JobState from ``scontrol`` (works without slurmdbd, unlike sacct); None once purged."""
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for token in out.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return None


def _wait(job: submitit.Job, executor: str, poll_s: float = 3.0) -> list[Any]:
    """Wait for every task's result; fail (instead of hanging) if SLURM ended the job without one.

    submitit learns job states from ``sacct``, which needs slurmdbd; ``scontrol``
    is asked as well so a cancelled or killed job is noticed everywhere.
    """
    import time

    gone_since: float | None = None
    while True:
        if job.done():
            return job.results()
        if executor == "slurm":
            state = _slurm_state(job.job_id)
            if state is None or state in _FINAL_FAILED or state == "COMPLETED":
                gone_since = gone_since or time.time()
                if time.time() - gone_since > 30:  # results land within seconds of the end
                    raise RuntimeError(f"job {job.job_id} ended {state} without a result; see {job.paths.stderr}")
            else:
                gone_since = None
        time.sleep(poll_s)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m brainage_hpc.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML file or built-in name")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU, or one per node on CPU")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", type=int, dest="time_min", help="wall time in minutes")
    p.add_argument("--executor", choices=["slurm", "local"])
    p.add_argument("--run-dir", help="default: checkpoints/<config name>")
    p.add_argument("--resume", default="auto", help="auto | none | PATH")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    p.add_argument("--wait", action="store_true", help="follow the job and exit with its status")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    return p


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["predict"]:  # cohort scoring array: evaluation/predict_job.py
        from brainage_hpc.evaluation.predict_job import main as predict_main
        return predict_main((sys.argv[1:] if argv is None else argv)[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    launch_overrides = [
        f"launch.{key}={value}"
        for key, value in (
            ("nodes", args.nodes), ("gpus_per_node", args.gpus_per_node), ("tasks_per_node", args.tasks_per_node),
            ("cpus_per_task", args.cpus_per_task), ("partition", args.partition), ("account", args.account),
            ("time_min", args.time_min), ("executor", args.executor),
        )
        if value is not None
    ]
    try:
        cfg = load_config(args.config, list(args.overrides) + launch_overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or f"checkpoints/{cfg.name}").resolve()
    if args.dry_run:
        print(_dry_run_script(cfg, run_dir))
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    ex = build_executor(cfg, run_dir, cfg.launch.executor)
    job = ex.submit(TrainJob(config_to_dict(cfg), str(run_dir), args.resume))
    print(f"submitted job {job.job_id} ({cfg.launch.executor}, {cfg.launch.nodes} node(s))")
    print(f"  logs:        {job.paths.stdout}  {job.paths.stderr}")
    print(f"  run dir:     {run_dir}")
    print(f"  tensorboard: tensorboard --logdir {run_dir / 'tb'}")
    if not args.wait:
        return 0
    try:
        results = _wait(job, cfg.launch.executor)
    except Exception as exc:  # submitit re-raises the job's traceback text
        text = str(exc).strip().splitlines()
        print(f"launch: job {job.job_id} failed: {text[-1] if text else exc}", file=sys.stderr)
        print("\n".join(text[-25:]), file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {results[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
