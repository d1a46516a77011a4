"""Where am I in the job? Rank discovery for torchrun, SLURM srun and submitit.

All rank/world/master information comes from :func:`discover_env`, so no
other module reads ``os.environ`` for it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, NoReturn

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "clean_exit", "discover_env", "free_port", "init_distributed", "select_device"]

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port free on this host now (for ``torchrun --master_port`` of a local run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of this process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: Literal["single", "torchrun", "slurm"] = "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0


def _resolvable(host: str) -> str:
    """Return ``host`` if it resolves, else 127.0.0.1 (local test clusters name nodes n1..n4)."""
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        log.warning("master host %r does not resolve; using 127.0.0.1", host)
        return "127.0.0.1"


def discover_env() -> DistEnv:
    """Find rank, world size and master from torchrun or SLURM (srun / submitit).

    torchrun sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; under SLURM we use
    ``submitit.helpers.TorchDistributedEnvironment`` (first host of the node
    list, port derived from the job id), which also covers submitit jobs.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and ntasks > 1:
        if "MASTER_ADDR" in env:  # exported by our sbatch scripts
            addr, port = env["MASTER_ADDR"], int(env.get("MASTER_PORT", 29500))
        else:
            from submitit.helpers import TorchDistributedEnvironment

            tde = TorchDistributedEnvironment()
            addr, port = tde.master_addr, tde.master_port
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=ntasks,
            master_addr=_resolvable(addr),
            master_port=port,
            source="slurm",
        )
    return DistEnv()


def select_device(env: DistEnv) -> torch.device:
    """One GPU per local rank when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        device = torch.device("cuda", env.local_rank % n)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(env: DistEnv, device: torch.device, timeout_s: int = 600) -> None:
    """``init_process_group`` with nccl on GPU and gloo on CPU; no-op for one process.

    ``timeout_s`` (``train.dist_timeout_s``) bounds every collective: a rank that died
    frees the allocation after this long instead of NCCL's default 30 minutes.
    """
    if not env.is_distributed or dist.is_initialized():
        return
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    log.info("rank %d/%d joined %s process group at %s:%d", env.rank, env.world_size, backend, env.master_addr, env.master_port)


def clean_exit(code: int) -> NoReturn:
    """Barrier, destroy the process group, flush, then ``os._exit``.

    gloo can abort in its own atexit/destructor path after
    ``destroy_process_group`` in a measurable share of runs; leaving through
    ``os._exit`` after flushing skips those destructors.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception as exc:  # a peer already died: still leave cleanly
            log.warning("barrier at exit failed: %s", exc)
        try:
            dist.destroy_process_group()
        except Exception as exc:
            log.warning("destroy_process_group failed: %s", exc)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
