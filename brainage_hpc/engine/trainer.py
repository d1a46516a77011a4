"""One training loop for every model and backend.

The loop reads like a script: ``fit`` -> ``on_train_start`` -> for each epoch
``train_epoch`` (micro-batches, accumulation, optimizer steps, logging,
preemption check) -> ``validate`` -> ``on_epoch_end`` (best model, checkpoint,
early stop). Models return ``{"loss", "loss/<part>", ...}`` from ``forward``
so there are no per-model branches here.
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

from brainage_hpc.config import RunConfig, config_to_dict
from brainage_hpc.engine import checkpoint as ckpt
from brainage_hpc.engine.backends import Backend
from brainage_hpc.engine.logging import RunLogger
from brainage_hpc.engine.val_metrics import ValAccumulator

__all__ = ["Trainer", "TrainState", "Outcome", "PREEMPT_EXIT_CODE"]

log = logging.getLogger(__name__)
Outcome = Literal["completed", "preempted", "early_stopped", "diverged"]
# Exit code of a process that checkpointed because of SIGUSR1/SIGTERM: the
# sbatch script and the launcher requeue on it.
PREEMPT_EXIT_CODE = 3
# Test hook: sleep this long after each optimizer step (to signal a run mid-way).
_STEP_SLEEP_S = float(os.environ.get("BRAINAGE_TEST_STEP_SLEEP_S", "0") or 0)


@dataclass
class TrainState:
    """Counters restored on resume (everything the loop needs besides weights)."""

    epoch: int = 0
    step: int = 0  # optimizer steps done
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
        self._stop_requested = False
        self.accum = cfg.train.grad_accum
        self.steps_per_epoch = max(len(train_data) // self.accum, 1)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.input_dtype = getattr(backend, "input_dtype", None)
        if isinstance(getattr(train_data, "loader", None), torch.utils.data.DataLoader):
            # A private generator keeps DataLoader iterator creation from consuming
            # the global torch RNG, which exact resume restores.
            train_data.loader.generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + backend.env.rank)

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> dict[int, Any]:
        """SIGUSR1/SIGTERM set a flag; the loop checkpoints at the next step boundary.

        Returns the previous handlers, which :meth:`fit` puts back when it returns: a
        process that trains in-process and later forks (a notebook, a test runner)
        must not hand children a SIGTERM that only sets a flag, or ``Pool.terminate``
        can no longer stop them.
        """

        def _request_stop(signum: int, _frame: Any) -> None:
            self._stop_requested = True
            log.warning("rank %d got %s: will checkpoint at the next step boundary", self.backend.env.rank, signal.Signals(signum).name)

        return {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def request_stop(self) -> None:
        """Ask the loop to checkpoint and stop (used by the submitit job)."""
        self._stop_requested = True

    def _all_agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.backend.device)
        return bool(self.backend.all_reduce(flag, "max").item() > 0)

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        rng = ckpt.capture_rng()
        if self.backend.env.is_distributed and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.backend.env.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        sampler = self.train_data.sampler
        consumed = self.state.batches_done * self.backend.micro_batch
        return {
            "format_version": ckpt.CKPT_FORMAT,
            "epoch": self.state.epoch,
            "step": self.state.step,
            "batches_done": self.state.batches_done,
            "best_metric": self.state.best_metric,
            "best_step": self.state.best_step,
            "epochs_since_best": self.state.epochs_since_best,
            "bad_steps": self.state.bad_steps,
            "sampler": sampler.state_dict(consumed) if sampler is not None else None,
            "rng": rngs,
            "world_size": self.backend.env.world_size,
            "config": config_to_dict(self.cfg),
            "git_sha": self.meta.get("git_sha", "unknown"),
            "shape": self.meta.get("shape"),
            "preprocess": self.meta.get("preprocess"),
            "affine": self.meta.get("affine"),
        }

    def save_checkpoint(self, is_best: bool = False) -> Path:
        """Checkpoint the current step on every backend, then update last/best and prune."""
        b = self.backend
        path = ckpt.checkpoint_path(self.run_dir, self.state.step, b.name)
        state = self._trainer_state()
        b.save(path, state, self.model, self.optimizer)
        if b.name == "deepspeed":
            b.barrier()
            if b.is_global_zero:
                ckpt.atomic_torch_save(state, path / "trainer_state.pt")
                (path / ".complete").touch()
                _write_pointer(self.run_dir / "ds" / "last.txt", path.name)
                if is_best:
                    _write_pointer(self.run_dir / "ds" / "best.txt", path.name)
        elif b.is_global_zero:
            ckpt.link_as(path, "last.pt")
            if is_best:
                ckpt.link_as(path, "best.pt")
        if b.is_global_zero:
            protect = {path}
            best = self._best_path()
            if best is not None:
                protect.add(best)
            ckpt.prune_checkpoints(self.run_dir, b.name, self.cfg.train.keep_last, protect)
        b.barrier()
        return path

    def _best_path(self) -> Path | None:
        if self.state.best_step < 0:
            return None
        return ckpt.checkpoint_path(self.run_dir, self.state.best_step, self.backend.name)

    def resume(self, resume: str) -> bool:
        """Load the newest readable checkpoint; a corrupt one is skipped with a warning."""
        for path in ckpt.find_resume(self.run_dir, self.backend.name, resume):
            try:
                stored = self.backend.load(path, self.model, self.optimizer)
            except Exception as exc:  # corrupt or partial: fall back to the previous one
                log.warning("skipping unreadable checkpoint %s (%s: %s)", path, exc.__class__.__name__, exc)
                continue
            self._restore_trainer_state(stored)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step, self.state.epoch, self.state.batches_done)
            self.logger.event("resume", self.state.step, path=str(path), epoch=self.state.epoch)
            return True
        if resume not in ("auto", "none"):
            raise RuntimeError(f"{resume}: checkpoint could not be loaded")
        return False

    def _restore_trainer_state(self, stored: dict[str, Any]) -> None:
        s = self.state
        s.epoch, s.step, s.batches_done = int(stored["epoch"]), int(stored["step"]), int(stored["batches_done"])
        s.best_metric = stored.get("best_metric")
        s.best_step = int(stored.get("best_step", -1))
        s.epochs_since_best = int(stored.get("epochs_since_best", 0))
        s.bad_steps = int(stored.get("bad_steps", 0))
        if stored.get("sampler") is not None and self.train_data.sampler is not None:
            self.train_data.sampler.load_state_dict(stored["sampler"])
        rngs = stored.get("rng") or []
        rank = self.backend.env.rank
        if len(rngs) == self.backend.env.world_size:
            ckpt.restore_rng(rngs[rank])
        elif rngs:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: RNG not restored", len(rngs), self.backend.env.world_size)

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: str = "auto") -> Outcome:
        """Train until the planned step count, early stop, divergence or preemption."""
        previous = self.install_signal_handlers()
        try:
            return self._fit(resume)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _fit(self, resume: str) -> Outcome:
        self.resume(resume)
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
        if outcome in ("completed", "early_stopped") and self.backend.is_global_zero:
            self.logger.hparams(
                {"model": self.cfg.model.name, "task": self.cfg.model.task, "backend": self.backend.name,
                 "precision": self.cfg.train.precision, "lr": self.cfg.train.lr, "batch_size": self.cfg.data.batch_size},
                {"best_metric": self.state.best_metric if self.state.best_metric is not None else math.nan},
            )
        self.logger.event("end", self.state.step, outcome=outcome)
        return outcome

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
                loss = out["loss"]
                finite = b.all_reduce(torch.isfinite(loss.detach()).float().reshape(1), "min")
                # .item(): one sync per micro-batch so all ranks skip a non-finite loss together.
                if finite.item() < 1:
                    window.bad = True
                    loss = self._zero_loss()
                b.backward(loss)
            window.add(out, batch["image"].shape[0], t_data)
            stepped, grad_norm = b.step(boundary)
            s.batches_done += 1
            if not boundary:
                continue
            if window.bad or not stepped:
                s.bad_steps += 1
                log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", s.step, s.bad_steps)
                if s.bad_steps > cfg.nan_max:
                    log.error("more than %d non-finite steps: stopping (diverged)", cfg.nan_max)
                    self.logger.event("diverged", s.step, bad_steps=s.bad_steps)
                    return "diverged"
            s.step += 1
            now = time.perf_counter()
            window.step_time += now - t_last
            t_last = now
            if s.step % cfg.log_every_steps == 0 or s.step == self.total_steps:
                self._log_train(window, grad_norm)
                window = _Window(b.device)
            self.logger.update_bar(1, epoch=s.epoch)
            if _STEP_SLEEP_S:
                time.sleep(_STEP_SLEEP_S)
            if self._all_agree_to_stop():
                self.save_checkpoint()
                self.logger.event("preempt", s.step, epoch=s.epoch, batches_done=s.batches_done)
                return "preempted"
            if cfg.ckpt_every_steps and s.step % cfg.ckpt_every_steps == 0:
                self.save_checkpoint()
            if s.step >= self.total_steps:
                if s.batches_done >= len(data):
                    s.batches_done = 0
                    s.epoch += 1
                else:
                    self.save_checkpoint()
                return "completed"
        s.batches_done = 0
        s.epoch += 1
        return "completed"

    def _log_train(self, w: "_Window", grad_norm: float) -> None:
        b = self.backend
        sums = b.all_reduce(w.sums.clone(), "sum")
        n = max(float(sums[0].item()), 1.0)  # .item(): sync at logging interval only
        values = {f"train/{k}": float(v) / n for k, v in zip(w.keys, sums[1:].tolist())}
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
        self.bad = False

    def add(self, out: dict[str, torch.Tensor], n: int, t_data: float) -> None:
        parts = {k: v for k, v in out.items() if k == "loss" or k.startswith("loss/")}
        if not self.keys:
            self.keys = sorted(parts)
            self.sums = torch.zeros(len(self.keys) + 1, device=self.device)
        vals = torch.stack([parts[k].detach().float().reshape(()) if k in parts else torch.zeros((), device=self.device) for k in self.keys])
        vals = torch.nan_to_num(vals, nan=0.0, posinf=0.0, neginf=0.0)
        self.sums += torch.cat([torch.tensor([float(n)], device=self.device), vals * n])
        self.data_time += t_data


def _write_pointer(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
