"""Distribution and precision behind one small interface.

The trainer never branches on DDP vs DeepSpeed or on fp16 vs bf16: it calls

* ``setup(model, optimizer, scheduler) -> (model, optimizer)`` (joint, as DeepSpeed needs),
* ``autocast()`` around forward, ``backward(loss)`` per micro-batch,
* ``no_sync(model, enabled)`` around non-boundary micro-batches,
* ``step(is_boundary) -> bool`` (clip, optimizer, scheduler, zero grad),
* ``all_reduce``, ``barrier``, ``unwrap``, ``save``/``load``.

Backends are siblings, not subclasses of each other.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from brainage_hpc.config import TrainConfig
from brainage_hpc.engine.distributed import DistEnv

__all__ = ["Backend", "Precision", "SingleBackend", "DDPBackend", "DeepSpeedBackend", "build_backend", "deepspeed_config"]

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


class Backend(ABC):
    """One interface for single-process, DDP and DeepSpeed training."""

    name = "base"

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
    def step(self, is_boundary: bool) -> tuple[bool, float]:
        """Finish a micro-batch; at a boundary clip, step optimizer and scheduler.

        Returns:
            (stepped, grad_norm): whether the optimizer stepped, and the gradient
            norm before clipping (NaN when not a boundary).
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
    def load(self, path: Path, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """Restore model/optimizer/scaler/scheduler; return the trainer state stored with them."""


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

    def step(self, is_boundary: bool) -> tuple[bool, float]:
        if not is_boundary:
            return False, math.nan
        scaler = self.precision.scaler
        scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # .item() forces a CPU-GPU sync: once per optimizer step, needed to skip non-finite steps.
        norm_value = float(norm.item())
        if scaler.is_enabled():
            # GradScaler skips the step itself on inf/NaN gradients and lowers the scale.
            scale_before = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            stepped = math.isfinite(norm_value) and scaler.get_scale() >= scale_before
        else:
            stepped = math.isfinite(norm_value)
            if stepped:
                self.optimizer.step()
        if stepped and self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped, norm_value

    def save(self, path: Path, state: dict[str, Any], model: nn.Module, optimizer: Any) -> None:
        from brainage_hpc.engine.checkpoint import atomic_torch_save

        if not self.is_global_zero:
            return
        full = dict(state)
        full["model"] = self.unwrap(model).state_dict()
        full["optimizer"] = optimizer.state_dict()
        full["scaler"] = self.precision.scaler.state_dict()
        full["scheduler"] = self.scheduler.state_dict() if self.scheduler is not None else None
        full["backend"] = self.name
        atomic_torch_save(full, path)

    def load(self, path: Path, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        self.unwrap(model).load_state_dict(ckpt.pop("model"))
        optimizer.load_state_dict(ckpt.pop("optimizer"))
        scaler_state = ckpt.pop("scaler", None)
        if scaler_state:
            self.precision.scaler.load_state_dict(scaler_state)
        sched_state = ckpt.pop("scheduler", None)
        if sched_state is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(sched_state)
        return ckpt


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
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True)

    def no_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        if enabled and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()


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

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[nn.Module, Any]:
        import deepspeed

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

    def step(self, is_boundary: bool) -> tuple[bool, float]:
        self.engine.step()
        if not is_boundary:
            return False, math.nan
        norm = self.engine.get_global_grad_norm()
        value = float(norm) if norm is not None else math.nan
        skipped = bool(getattr(self.engine, "skipped_steps", 0) and getattr(self.engine.optimizer, "overflow", False))
        return not skipped, value

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def save(self, path: Path, state: dict[str, Any], model: nn.Module, optimizer: Any) -> None:
        # path is the run's ds/ folder + tag; every rank writes its ZeRO partition.
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"trainer": state})

    def load(self, path: Path, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        load_path, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
        return dict(client.get("trainer", {}))


def build_backend(env: DistEnv, device: torch.device, cfg: TrainConfig, micro_batch: int) -> Backend:
    """Backend named by ``train.backend``."""
    table: dict[str, type[Backend]] = {"single": SingleBackend, "ddp": DDPBackend, "deepspeed": DeepSpeedBackend}
    if cfg.backend not in table:
        raise ValueError(f"Unknown backend '{cfg.backend}'. Valid: {', '.join(table)}")
    if cfg.backend == "single" and env.is_distributed:
        raise ValueError(f"backend 'single' cannot run {env.world_size} processes; use train.backend=ddp or deepspeed")
    return table[cfg.backend](env, device, cfg, micro_batch)

