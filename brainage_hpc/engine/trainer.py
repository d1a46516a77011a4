"""One training loop for every model and backend.

The loop reads like a script: ``fit`` -> resume -> for each epoch
``train_epoch`` (micro-batches, accumulation, optimizer steps, logging,
stop requests) -> ``validate`` -> ``on_epoch_end`` (best model, checkpoint,
early stop). Models return ``{"loss", "loss/<part>", ...}`` from ``forward``
so there are no per-model branches here.

Host-device syncs: losses, non-finite flags and gradient norms stay on the
device; they are read once per logging interval and at checkpoints
(``syncs.host_values``). A non-finite loss or gradient skips the whole update
on the device; the count is checked against ``train.nan_max`` at those reads.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from brainage_hpc.config import RunConfig
from brainage_hpc.engine.backends import Backend
from brainage_hpc.engine.keeper import CheckpointKeeper
from brainage_hpc.engine.logging import RunLogger
from brainage_hpc.engine.schedule import lr_plan_of
from brainage_hpc.engine.signals import PREEMPT_EXIT_CODE, StopRequests, stop_exit_code
from brainage_hpc.engine.syncs import host_values
from brainage_hpc.engine.val_metrics import ValAccumulator

__all__ = ["Trainer", "TrainState", "Outcome", "PREEMPT_EXIT_CODE", "stop_exit_code"]

log = logging.getLogger(__name__)
# preempted: SIGUSR1 (exit 3, requeue); stopped: SIGTERM/SIGINT (exit 128+signum, no requeue)
Outcome = Literal["completed", "preempted", "stopped", "early_stopped", "diverged"]
# Test hook: sleep this long after each optimizer step (to signal a run mid-way).
_STEP_SLEEP_S = float(os.environ.get("BRAINAGE_TEST_STEP_SLEEP_S", "0") or 0)


@dataclass
class TrainState:
    """Counters restored on resume (everything the loop needs besides weights)."""

    epoch: int = 0
    step: int = 0  # optimizer steps done (skipped updates included)
    batches_done: int = 0  # micro-batches done in the current epoch
    best_metric: float | None = None
    best_step: int = -1
    epochs_since_best: int = 0
    bad_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Runs ``fit`` for one model on one backend; rank 0 logs and writes files."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        backend: Backend,
        model: nn.Module,
        optimizer: Any,
        train_data: Any,
        val_data: Any | None,
        logger: RunLogger,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.backend = backend
        self.model = model
        self.optimizer = optimizer
        self.train_data = train_data
        self.val_data = val_data
        self.logger = logger
        self.meta = meta or {}
        self.state = TrainState()
        self.accum = cfg.train.grad_accum
        self.steps_per_epoch = max(len(train_data) // self.accum, 1)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.input_dtype = getattr(backend, "input_dtype", None)
        self.lr_plan = lr_plan_of(getattr(backend, "scheduler", None))
        self.stops = StopRequests(backend.env.rank, backend.env.is_distributed, cfg.train.dist_timeout_s)
        self.stop_signal = 0
        self.keeper = CheckpointKeeper(self)
        self._bad = torch.zeros((), dtype=torch.int32, device=backend.device)  # skipped updates not yet read
        self._clean_until = 0  # last step at which the skipped-update count was read as zero
        if isinstance(getattr(train_data, "loader", None), torch.utils.data.DataLoader):
            # A private generator keeps DataLoader iterator creation from consuming
            # the global torch RNG, which exact resume restores.
            train_data.loader.generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + backend.env.rank)

    # ------------------------------------------------------------------ stop requests

    def request_stop(self, signum: int = signal.SIGUSR1) -> None:
        """Ask the loop to checkpoint and stop (SIGUSR1 semantics: requeue wanted)."""
        self.stops.request(signum)

    def exit_code(self, outcome: Outcome) -> int:
        """Process exit code of ``outcome`` (contract with the sbatch scripts and the launcher)."""
        if outcome in ("preempted", "stopped"):
            return stop_exit_code(self.stop_signal or signal.SIGUSR1)
        return 1 if outcome == "diverged" else 0

    # ------------------------------------------------------------------ checkpoints

    def trainer_state(self) -> dict[str, Any]:
        """Everything besides weights and optimizer that a resume needs (collective: RNG of all ranks)."""
        return self.keeper.trainer_state()

    def save_checkpoint(self, is_best: bool = False) -> Path:
        """Checkpoint the current step on every backend, then update last/best and prune."""
        return self.keeper.save(is_best)

    def resume(self, resume: str) -> bool:
        """Load the newest verified checkpoint (``auto``), a given one, or none; see ``keeper``."""
        return self.keeper.resume(resume)

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: str = "auto") -> Outcome:
        """Train until the planned step count, early stop, divergence or a stop request."""
        self.stops.install()
        try:
            return self._fit(resume)
        finally:
            self.stops.close()
            self.stops.restore()

    def _fit(self, resume: str) -> Outcome:
        resumed = self.resume(resume)  # refused resumes raise here, before any file is written
        self.logger.open(self.state.step)  # drops log records after the resume point
        if resumed:
            self.logger.event("resume", self.state.step, path=str(self.keeper.resumed_from), epoch=self.state.epoch)
        self.logger.event("start", self.state.step, total_steps=self.total_steps, world_size=self.backend.env.world_size)
        self.logger.start_bar(self.total_steps, self.state.step, desc=self.cfg.name)
        outcome: Outcome = "completed"
        try:
            while self.state.step < self.total_steps and self.state.epoch < max(self.cfg.train.epochs, 1) * 10**6:
                outcome = self.train_epoch()
                if outcome != "completed":
                    break
                if self.state.batches_done == 0:  # a full epoch finished
                    outcome = self.on_epoch_end()
                    if outcome != "completed":
                        break
                if not self.cfg.train.max_steps and self.state.epoch >= self.cfg.train.epochs:
                    break
        finally:
            self.logger.close_bar()
        if outcome == "diverged":
            self.keeper.on_diverged(self._clean_until)
        if outcome in ("completed", "early_stopped") and self.backend.is_global_zero:
            self.logger.hparams(self._hparams(), self._hparam_metrics())
        self.logger.event("end", self.state.step, outcome=outcome)
        return outcome

    def _hparams(self) -> dict[str, Any]:
        c, t = self.cfg, self.cfg.train
        return {
            "model": c.model.name, "task": c.model.task, "backend": self.backend.name, "precision": t.precision,
            "world_size": self.backend.env.world_size, "epochs": t.epochs, "max_steps": t.max_steps,
            "total_steps": self.total_steps, "lr": t.lr, "batch_size": c.data.batch_size, "grad_accum": t.grad_accum,
            "optimizer": t.optimizer, "schedule": t.schedule, "seed": t.seed, "monitor": f"{t.monitor} ({t.monitor_mode})",
        }

    def _hparam_metrics(self) -> dict[str, float]:
        best = self.state.best_metric if self.state.best_metric is not None else math.nan
        return {self.cfg.train.monitor: best, "best_metric": best, "best_step": float(self.state.best_step)}

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        nb = self.backend.device.type == "cuda"
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.backend.device, non_blocking=nb)
                if self.input_dtype is not None and v.is_floating_point() and k not in ("age",):
                    v = v.to(self.input_dtype)
            out[k] = v
        return out

    def _zero_loss(self) -> torch.Tensor:
        """A loss with zero gradient for every parameter (replaces a non-finite loss)."""
        return sum(p.sum() for p in self.model.parameters()) * 0.0  # type: ignore[return-value]

    def _guard_loss(self, loss: torch.Tensor, window: _Window) -> torch.Tensor:
        b = self.backend
        if b.host_checks_loss:
            # DeepSpeed would apply non-finite gradients in bf16/fp32: catch the loss on the host.
            finite = b.all_reduce(torch.isfinite(loss.detach()).float().reshape(1), "min")
            if host_values(finite)[0] < 1:  # sync: once per micro-batch, DeepSpeed only
                window.host_bad = True
                return self._zero_loss()
            return loss
        # A non-finite loss turns every gradient into NaN (on all ranks, through DDP's
        # all-reduce), so the backend skips the update on the device; a finite one is
        # multiplied by exactly 1.
        one = torch.ones((), device=loss.device, dtype=loss.dtype)
        return loss * torch.where(torch.isfinite(loss.detach()), one, one * math.nan)

    def train_epoch(self) -> Outcome:
        cfg, b, s = self.cfg.train, self.backend, self.state
        data = self.train_data
        if data.sampler is not None and s.batches_done == 0:
            data.sampler.set_epoch(s.epoch)
        self.model.train()
        window = _Window(b.device)
        it = iter(data.loader)
        t_last = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t_data = time.perf_counter() - t0
            batch = self._to_device(batch)
            if data.device_augment is not None:
                batch = data.device_augment(batch)
            boundary = (s.batches_done + 1) % self.accum == 0
            with b.no_sync(self.model, enabled=not boundary):
                with b.autocast():
                    out = self.model(batch)
                b.backward(self._guard_loss(out["loss"], window))
            window.add(out, batch["image"].shape[0], t_data)
            result = b.step(boundary)
            s.batches_done += 1
            if result is None:
                continue
            self._bad += result.skipped.to(torch.int32)
            if window.host_bad:
                self._bad += 1
                window.host_bad = False
            window.grad_norm = result.grad_norm
            s.step += 1
            now = time.perf_counter()
            window.step_time += now - t_last
            t_last = now
            if s.step % cfg.log_every_steps == 0 or s.step == self.total_steps:
                if self._log_train(window):
                    return "diverged"
                window = _Window(b.device)
            self.logger.update_bar(1, epoch=s.epoch)
            if _STEP_SLEEP_S:
                time.sleep(_STEP_SLEEP_S)
            signum = self.stops.poll()
            if signum:
                if self._read_bad():
                    return "diverged"
                self.stop_signal = signum
                self.save_checkpoint()
                self.logger.event("preempt" if signum == signal.SIGUSR1 else "stop", s.step, epoch=s.epoch,
                                  batches_done=s.batches_done, signal=signal.Signals(signum).name)
                return "preempted" if signum == signal.SIGUSR1 else "stopped"
            if cfg.ckpt_every_steps and s.step % cfg.ckpt_every_steps == 0:
                if self._read_bad():
                    return "diverged"
                self.save_checkpoint()
            if s.step >= self.total_steps:
                if s.batches_done >= len(data):
                    s.batches_done = 0
                    s.epoch += 1
                else:
                    if self._read_bad():
                        return "diverged"
                    self.save_checkpoint()
                return "completed"
        s.batches_done = 0
        s.epoch += 1
        return "completed"

    def _count_bad(self, n: int) -> bool:
        """Add ``n`` skipped updates read from the device; True when the run has diverged."""
        s = self.state
        if n:
            s.bad_steps += n
            log.warning("steps %d-%d: %d update(s) skipped for a non-finite loss or gradient (%d so far)",
                        self._clean_until + 1, s.step, n, s.bad_steps)
        else:
            self._clean_until = s.step
        self._bad.zero_()
        if s.bad_steps > self.cfg.train.nan_max:
            self.logger.event("diverged", s.step, bad_steps=s.bad_steps)
            return True
        return False

    def _read_bad(self) -> bool:
        return self._count_bad(int(host_values(self._bad)[0]))  # sync: at checkpoints only

    def _log_train(self, w: _Window) -> bool:
        """Log the window's means; returns True when the run has diverged (one host sync)."""
        b = self.backend
        sums = b.all_reduce(w.sums.clone(), "sum")
        norm = w.grad_norm if w.grad_norm is not None else torch.tensor(math.nan, device=b.device)
        packed = torch.cat([sums, self._bad.to(sums.dtype).reshape(1), norm.to(sums.dtype).reshape(1)])
        values_host = host_values(packed)  # sync: once per logging interval
        n = max(values_host[0], 1.0)
        grad_norm = values_host[-1]
        values = {f"train/{k}": v / n for k, v in zip(w.keys, values_host[1:-2])}
        values["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
        if math.isfinite(grad_norm):
            values["train/grad_norm"] = grad_norm
        if w.step_time > 0:
            values["perf/volumes_per_s"] = n / w.step_time
            values["perf/data_wait_fraction"] = min(w.data_time / w.step_time, 1.0)
        if b.device.type == "cuda":
            values["perf/max_memory_gb"] = torch.cuda.max_memory_allocated(b.device) / 2**30
        self.logger.scalars(values, self.state.step, epoch=self.state.epoch)
        self.logger.update_bar(0, loss=values.get("train/loss", math.nan))
        return self._count_bad(int(values_host[-2]))

    # ------------------------------------------------------------------ validation / epoch end

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Metrics over the whole validation split (sums all-reduced once)."""
        if self.val_data is None:
            return {}
        model = self.model if self.backend.name == "deepspeed" and self.cfg.train.zero_stage >= 3 else self.backend.unwrap(self.model)
        model.eval()
        acc = ValAccumulator(self.cfg.model.task, self.backend.device)
        first: dict[str, Any] | None = None
        for batch in self.val_data.loader:
            batch = self._to_device(batch)
            with self.backend.autocast():
                out = model(batch)
            acc.add(out, batch)
            if first is None:
                first = {"image": batch["image"][0], **({"recon": out["recon"][0]} if "recon" in out else {})}
        metrics = acc.compute(self.backend)
        self.model.train()
        if first is not None and self.state.epoch % max(self.cfg.train.image_log_every_epochs, 1) == 0:
            self.logger.image("val/input", first["image"], self.state.step)
            if "recon" in first:
                self.logger.image("val/reconstruction", first["recon"], self.state.step)
        return metrics

    def on_epoch_end(self) -> Outcome:
        cfg, s = self.cfg.train, self.state
        metrics: dict[str, float] = {}
        if self.val_data is not None and s.epoch % max(cfg.val_every_epochs, 1) == 0:
            metrics = self.validate()
            self.logger.scalars(metrics, s.step, epoch=s.epoch)
        is_best = False
        value = metrics.get(cfg.monitor)
        if value is not None and math.isfinite(value):
            better = s.best_metric is None or (value < s.best_metric if cfg.monitor_mode == "min" else value > s.best_metric)
            if better:
                s.best_metric, s.best_step, s.epochs_since_best, is_best = value, s.step, 0, True
            else:
                s.epochs_since_best += 1
        elif not metrics and s.best_step < 0:
            is_best = True  # no validation: the latest model is the best we know
            s.best_step = s.step
        if self._read_bad():
            return "diverged"
        self.save_checkpoint(is_best=is_best)
        if cfg.early_stop_patience and s.epochs_since_best >= cfg.early_stop_patience:
            log.info("early stop: %s did not improve for %d epochs", cfg.monitor, s.epochs_since_best)
            self.logger.event("early_stop", s.step, best=s.best_metric)
            return "early_stopped"
        return "completed"


class _Window:
    """Loss sums over the micro-batches since the last log line (kept on device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: list[str] = []
        self.sums = torch.zeros(1, device=device)
        self.data_time = 0.0
        self.step_time = 0.0
        self.host_bad = False  # DeepSpeed: a non-finite loss caught on the host in this step
        self.grad_norm: torch.Tensor | None = None  # of the last step, on the device

    def add(self, out: dict[str, torch.Tensor], n: int, t_data: float) -> None:
        parts = {k: v for k, v in out.items() if k == "loss" or k.startswith("loss/")}
        if not self.keys:
            self.keys = sorted(parts)
            self.sums = torch.zeros(len(self.keys) + 1, device=self.device)
        vals = torch.stack([parts[k].detach().float().reshape(()) if k in parts else torch.zeros((), device=self.device) for k in self.keys])
        vals = torch.nan_to_num(vals, nan=0.0, posinf=0.0, neginf=0.0)
        self.sums += torch.cat([torch.tensor([float(n)], device=self.device), vals * n])
        self.data_time += t_data
