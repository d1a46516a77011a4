"""Distribution and precision behind one small interface.

The trainer never branches on DDP vs DeepSpeed or on fp16 vs bf16: it calls

* ``setup(model, optimizer, scheduler) -> (model, optimizer)`` (joint, as DeepSpeed needs),
* ``autocast()`` around forward, ``backward(loss)`` per micro-batch,
* ``no_sync(model, enabled)`` around non-boundary micro-batches,
* ``step(is_boundary) -> StepResult | None`` (clip, optimizer, scheduler, zero grad),
* ``all_reduce``, ``barrier``, ``unwrap``, ``save``/``read``/``apply``.

Backends are siblings, not subclasses of each other.

A non-finite loss or gradient skips the whole update *on the device*: the
gradient norm decides, and fused optimizers (and ``GradScaler``) take the
resulting ``found_inf`` flag without a host sync. The step result stays on
the device until the trainer reads it at a logging or checkpoint boundary.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from brainage_hpc.config import TrainConfig
from brainage_hpc.engine import checkpoint as ckpt
from brainage_hpc.engine.distributed import DistEnv
from brainage_hpc.engine.syncs import host_values

__all__ = [
    "Backend", "Precision", "StepResult", "SingleBackend", "DDPBackend", "DeepSpeedBackend", "build_backend",
    "deepspeed_config",
]

log = logging.getLogger(__name__)

_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class Precision:
    """Autocast and GradScaler for one precision mode; fp32 is a no-op.

    The scaler is enabled only for ``16-mixed`` (bf16 has fp32's range).
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in _DTYPES:
            raise ValueError(f"Unknown precision '{mode}'. Valid: {', '.join(_DTYPES)}")
        self.mode = mode
        self.device_type = device.type
        self.dtype = _DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "16-mixed")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


@dataclass
class StepResult:
    """Outcome of one optimizer step, as device tensors (reading them is a host sync).

    Attributes:
        skipped: () bool, the update was skipped (non-finite loss or gradient, fp16 overflow).
        grad_norm: () float, gradient norm before clipping.
    """

    skipped: torch.Tensor
    grad_norm: torch.Tensor


class Backend(ABC):
    """One interface for single-process, DDP and DeepSpeed training."""

    name = "base"
    # True when a non-finite loss must be caught on the host before backward (one sync
    # per micro-batch) because the backend would apply non-finite gradients.
    host_checks_loss = False

    def __init__(self, env: DistEnv, device: torch.device, cfg: TrainConfig, micro_batch: int) -> None:
        self.env = env
        self.device = device
        self.cfg = cfg
        self.micro_batch = micro_batch
        self.precision = Precision(cfg.precision, device)

    @property
    def is_global_zero(self) -> bool:
        return self.env.rank == 0

    @abstractmethod
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[nn.Module, Any]:
        """Wrap model and optimizer jointly (DeepSpeed requires both at once)."""

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.precision.autocast()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (unscaled, un-averaged) loss."""

    @abstractmethod
    def step(self, is_boundary: bool) -> StepResult | None:
        """Finish a micro-batch; at a boundary clip, step optimizer and scheduler.

        Returns:
            None between boundaries; at a boundary a :class:`StepResult` on the device.
        """

    def no_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip gradient all-reduce on non-boundary micro-batches."""
        return contextlib.nullcontext()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.env.is_distributed and dist.is_initialized():
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(t, op=ops[op])
        return t

    def barrier(self) -> None:
        if self.env.is_distributed and dist.is_initialized():
            dist.barrier()

    def unwrap(self, model: nn.Module) -> nn.Module:
        inner = getattr(model, "module", model)
        return getattr(inner, "_orig_mod", inner)

    @abstractmethod
    def save(self, path: Path, state: dict[str, Any], model: nn.Module, optimizer: Any) -> None:
        """Write a checkpoint (all ranks call it; who writes what is the backend's business)."""

    @abstractmethod
    def read(self, path: Path) -> dict[str, Any]:
        """Read and verify a checkpoint without touching the model; return the trainer state.

        Raises:
            CheckpointUnreadable: damaged, incomplete or not a checkpoint (one line).
        """

    @abstractmethod
    def apply(self, stored: dict[str, Any], path: Path, model: nn.Module, optimizer: Any) -> None:
        """Restore model/optimizer/scaler/scheduler from what :meth:`read` returned."""

    def load(self, path: Path, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """:meth:`read` then :meth:`apply`; returns the trainer state."""
        stored = self.read(path)
        self.apply(stored, path, model, optimizer)
        return stored


class _TorchBackend(Backend):
    """Shared logic of the single-process and DDP backends (plain torch optimizers)."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[nn.Module, Any]:
        self.optimizer = optimizer
        self.scheduler = scheduler
        return self._wrap(model), optimizer

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.scaler.scale(loss / self.cfg.grad_accum).backward()

    def step(self, is_boundary: bool) -> StepResult | None:
        if not is_boundary:
            return None
        opt, scaler = self.optimizer, self.precision.scaler
        scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        # DDP has averaged the gradients, so every rank computes the same norm and skips alike.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        skipped = ~torch.isfinite(norm)
        fused = all(g.get("fused") for g in opt.param_groups)
        if scaler.is_enabled():
            scaler.step(opt)  # skips on inf/NaN gradients itself (without a sync when fused)
            scaler.update()
        elif fused:
            opt.grad_scale, opt.found_inf = None, skipped.float()  # the fused kernel skips on the device
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
        elif host_values(skipped)[0] == 0:  # non-fused optimizer: one host sync per step
            opt.step()
        if self.scheduler is not None:
            self.scheduler.step()  # a skipped update still advances the schedule: lr is a function of the step
        opt.zero_grad(set_to_none=True)
        return StepResult(skipped, norm.detach())

    def save(self, path: Path, state: dict[str, Any], model: nn.Module, optimizer: Any) -> None:
        if not self.is_global_zero:
            return
        full = dict(state)
        full["model"] = self.unwrap(model).state_dict()
        full["optimizer"] = optimizer.state_dict()
        full["scaler"] = self.precision.scaler.state_dict()
        full["scheduler"] = self.scheduler.state_dict() if self.scheduler is not None else None
        full["backend"] = self.name
        ckpt.save_sealed(full, path)

    def read(self, path: Path) -> dict[str, Any]:
        stored = ckpt.read_checkpoint(path)
        if "model" not in stored or "optimizer" not in stored:
            raise ckpt.CheckpointUnreadable(f"{path}: not a training checkpoint (no model/optimizer state)")
        return stored

    def apply(self, stored: dict[str, Any], path: Path, model: nn.Module, optimizer: Any) -> None:
        self.unwrap(model).load_state_dict(stored.pop("model"))
        optimizer.load_state_dict(stored.pop("optimizer"))
        scaler_state = stored.pop("scaler", None)
        if scaler_state:
            self.precision.scaler.load_state_dict(scaler_state)
        sched_state = stored.pop("scheduler", None)
        if sched_state is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(sched_state)


class SingleBackend(_TorchBackend):
    """One process, one device."""

    name = "single"


class DDPBackend(_TorchBackend):
    """``DistributedDataParallel``; gradient sync only on the last micro-batch."""

    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not (self.env.is_distributed and dist.is_initialized()):
            log.info("ddp backend with one process: running without DDP wrapping")
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # BatchNorm running stats follow rank 0 at every forward (``broadcast_buffers`` is the deprecated name).
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=True)

    def no_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        if enabled and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()


def _skip_deepspeed_shm_op() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op.

    DeepSpeed's comm backend builds ``deepspeed_shm_comm`` (a C++ extension, 1-2 min
    of compiling on 2 cores, per fresh ``TORCH_EXTENSIONS_DIR``) on every CPU
    start, but uses it only for ``inference_all_reduce``; training all-reduces go
    through torch.distributed (gloo). Without the op nothing changes but the start-up.
    """
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: that binds deepspeed.comm's
    # attribute `torch`, which is PyTorch itself, not DeepSpeed's module of that name.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON config generated from TrainConfig, with ``train.deepspeed`` merged on top."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    if cfg.precision == "bf16-mixed":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "16-mixed":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 200}
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    merged = copy.deepcopy(ds)
    _merge(merged, cfg.deepspeed)
    return merged


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO 0-3 (optional CPU offload); precision from ``train.precision``.

    DeepSpeed owns loss scaling, gradient accumulation and clipping, so
    ``backward`` and ``step`` forward to the engine on every micro-batch.
    Autocast is left to DeepSpeed: its bf16/fp16 modes cast the model itself.
    """

    name = "deepspeed"
    host_checks_loss = True  # DeepSpeed's bf16/fp32 optimizers apply non-finite gradients

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[nn.Module, Any]:
        import deepspeed

        if self.device.type == "cpu":
            _skip_deepspeed_shm_op()
        config = deepspeed_config(self.cfg, self.micro_batch, self.env.world_size)
        log.debug("deepspeed config: %s", json.dumps(config))
        engine, ds_opt, _, ds_sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        self.engine = engine
        self.scheduler = ds_sched
        dtype = self.input_dtype
        if dtype != torch.float32 and self.device.type == "cpu":
            # DeepSpeed casts parameters but not BatchNorm running stats; the CPU
            # batch_norm kernel refuses mixed dtypes (CUDA accepts them).
            for buf in engine.module.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(dtype)
        return engine, ds_opt

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        # DeepSpeed's bf16/fp16 modes hold the module in that dtype; inputs are cast by the trainer hook.
        return contextlib.nullcontext()

    @property
    def input_dtype(self) -> torch.dtype:
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.cfg.precision, torch.float32)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, is_boundary: bool) -> StepResult | None:
        self.engine.step()
        if not is_boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        skipped = bool(getattr(self.engine, "skipped_steps", 0) and getattr(self.engine.optimizer, "overflow", False))
        value = norm.detach().float().reshape(()) if isinstance(norm, torch.Tensor) else torch.tensor(
            float("nan") if norm is None else float(norm))
        return StepResult(torch.tensor(skipped, device=self.device), value.to(self.device))

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def save(self, path: Path, state: dict[str, Any], model: nn.Module, optimizer: Any) -> None:
        # path is the run's ds/ folder + tag; every rank writes its ZeRO partition. The trainer
        # adds trainer_state.pt, checksums.sha256 and .complete once every rank is done.
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"trainer": state})

    def read(self, path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise ckpt.CheckpointUnreadable(f"{path}: not a DeepSpeed checkpoint folder (train.backend=deepspeed)")
        if self.is_global_zero:
            ckpt.verify_checkpoint(path)  # every file against checksums.sha256 (once, on rank 0)
        return ckpt.read_checkpoint(path / "trainer_state.pt", warn_unverified=False)

    def apply(self, stored: dict[str, Any], path: Path, model: nn.Module, optimizer: Any) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise ckpt.CheckpointUnreadable(f"{path}: DeepSpeed could not load this checkpoint")


def build_backend(env: DistEnv, device: torch.device, cfg: TrainConfig, micro_batch: int) -> Backend:
    """Backend named by ``train.backend``."""
    table: dict[str, type[Backend]] = {"single": SingleBackend, "ddp": DDPBackend, "deepspeed": DeepSpeedBackend}
    if cfg.backend not in table:
        raise ValueError(f"Unknown backend '{cfg.backend}'. Valid: {', '.join(table)}")
    if cfg.backend == "single" and env.is_distributed:
        raise ValueError(f"backend 'single' cannot run {env.world_size} processes; use train.backend=ddp or deepspeed")
    return table[cfg.backend](env, device, cfg, micro_batch)

