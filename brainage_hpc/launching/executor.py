"""The submitit executor for a run or a sweep, from ``RunConfig.launch``.

One task per GPU (one per node on CPU). The options an HPC user reaches for
(``--qos``, ``--mem``, ``--constraint``, ``--exclude``, ``--mail-type/--mail-user``,
``--array-parallelism``) are submitit's own SLURM parameters, so they show up as
``#SBATCH`` lines exactly as ``sbatch`` would take them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import submitit

from brainage_hpc.config import ConfigError, LaunchConfig, RunConfig

__all__ = ["build_executor", "dry_run_script", "parse_mem_gb", "srun_wait_s", "time_limit_warning"]


def parse_mem_gb(text: str) -> float:
    """SLURM memory syntax (``64G``, ``500M``, ``1T``; a bare number is MB, as in sbatch) -> GB.

    Example:
        >>> parse_mem_gb("64G"), parse_mem_gb("512M"), parse_mem_gb("2048")
        (64.0, 0.5, 2.0)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--mem {text!r}: expected a size like 64G, 500M or 1T (memory per node)")
    value, unit = float(m.group(1)), (m.group(2) or "M").upper()
    return value * {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit]


def time_limit_warning(lc: LaunchConfig) -> str | None:
    """A warning when ``--time`` leaves less than a minute before the checkpoint signal."""
    left = lc.time_min * 60 - lc.signal_delay_s
    if lc.executor != "slurm" or left >= 60:
        return None
    return (
        f"--time {lc.time_min} min leaves {max(left, 0)} s before the checkpoint signal "
        f"(launch.signal_delay_s={lc.signal_delay_s}): SLURM sends USR1 almost at once and every restart "
        f"checkpoints little or nothing; the job stops requeueing after "
        f"{lc.max_stalled_requeues} restarts without progress. Raise --time or lower launch.signal_delay_s."
    )


def srun_wait_s(cfg: RunConfig) -> int | None:
    """``srun --wait``: once one rank has ended, kill the rest this many seconds later.

    A hung rank then frees the allocation after the process-group timeout
    (``train.dist_timeout_s``) plus as much again (at most a minute) for the other
    ranks to notice and leave, even where a collective would hang forever.
    """
    timeout = int(cfg.train.dist_timeout_s)
    return timeout + min(timeout, 60) if timeout > 0 else None


def build_executor(cfg: RunConfig, folder: Path, executor: str) -> submitit.AutoExecutor:
    """AutoExecutor with the resources of ``cfg.launch``; ``folder`` holds submitit's files."""
    lc = cfg.launch
    tasks = lc.tasks_per_node or max(lc.gpus_per_node, 1)
    if executor == "local":
        if lc.nodes != 1:
            raise ConfigError(f"--executor local runs on this machine only: --nodes must be 1, got {lc.nodes}")
        ex = submitit.AutoExecutor(folder=str(folder), cluster="local")
    else:
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=lc.max_requeues)
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
        for key in ("partition", "account", "qos", "constraint", "exclude", "mail_type", "mail_user"):
            if getattr(lc, key):
                params[f"slurm_{key}"] = getattr(lc, key)
        if lc.array_parallelism:
            params["slurm_array_parallelism"] = lc.array_parallelism
        params["slurm_additional_parameters"] = {"requeue": True, **lc.slurm_additional}
        wait = srun_wait_s(cfg)
        if wait:
            params["slurm_srun_args"] = [f"--wait={wait}"]
        params["slurm_setup"] = [
            "export SUBMITIT_PREEMPT_SIGNAL=USR1",
            f"export TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR', str(Path.home() / '.cache/torch_extensions'))}",
            "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        ]
    ex.update_parameters(**params)
    return ex


def dry_run_script(cfg: RunConfig, folder: Path, array_size: int = 0) -> str:
    """The sbatch script submitit would submit (for a sweep: the job array of ``array_size`` tasks)."""
    from submitit.slurm.slurm import SlurmExecutor

    ex = build_executor(cfg, folder, "slurm")
    inner: SlurmExecutor = ex._executor  # type: ignore[assignment]
    if array_size > 1:
        inner.parameters["map_count"] = array_size  # what submitit sets itself for map_array / batch()
        try:
            return inner._make_submission_file_text(inner._submitit_command_str, "DRYRUN")
        finally:
            inner.parameters.pop("map_count", None)
    return inner._make_submission_file_text(inner._submitit_command_str, "DRYRUN")
