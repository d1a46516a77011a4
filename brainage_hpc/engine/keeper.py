"""Checkpoints of a running training: write, prune, resume, and what a divergence leaves.

Rules (issue 14):

* every checkpoint is verified when read; a damaged one is skipped with one
  warning line under ``--resume auto`` and refused under ``--resume PATH``;
* a resume is refused when the config or the data differ (``resume.check_compatible``),
  before anything in the run folder changes;
* after resuming from step R, checkpoints newer than R are moved to
  ``superseded/`` (never deleted), so neither ``--resume auto`` nor pruning
  can later prefer an abandoned future;
* pruning keeps the newest ``train.keep_last`` plus the best, the checkpoint this
  run resumed from and the one before it: a verified checkpoint from before the
  newest resume always survives;
* a diverged run prunes nothing, writes ``diverged.json`` naming the checkpoints
  to go back to, and ``--resume auto`` refuses to restart it until a person chooses.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from brainage_hpc.config import config_to_dict, save_config
from brainage_hpc.engine import checkpoint as ckpt
from brainage_hpc.engine.integrity import CheckpointUnreadable, write_folder_manifest
from brainage_hpc.engine.resume import (
    DIVERGED_NAME,
    ResumeError,
    archive_diverged,
    check_compatible,
    read_diverged,
    write_diverged,
)
from brainage_hpc.engine.syncs import host_values
from brainage_hpc.outputs import describe_os_error

if TYPE_CHECKING:
    from brainage_hpc.engine.trainer import Trainer

__all__ = ["CheckpointKeeper"]

log = logging.getLogger(__name__)


class CheckpointKeeper:
    """Checkpoint bookkeeping of one :class:`Trainer` (every rank has one; rank 0 writes)."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        self.resumed_from: Path | None = None
        self.before_resume: Path | None = None  # the checkpoint older than resumed_from, kept as a way back
        self.written: list[tuple[int, Path]] = []  # (step, path) written by this process

    @property
    def run_dir(self) -> Path:
        return self.t.run_dir

    def _agree(self, ok: bool) -> bool:
        """True when every rank says ok (a collective: all ranks call it together)."""
        b = self.t.backend
        if not b.env.is_distributed:
            return ok
        flag = b.all_reduce(torch.tensor([1.0 if ok else 0.0], device=b.device), "min")
        return host_values(flag)[0] > 0  # sync: at checkpoint/resume time only

    def trainer_state(self) -> dict[str, Any]:
        """Everything besides weights and optimizer that a resume needs (collective: RNG of all ranks)."""
        t = self.t
        rng = ckpt.capture_rng()
        if t.backend.env.is_distributed and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * t.backend.env.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        sampler = t.train_data.sampler
        if sampler is not None and t.state.batches_done == 0:
            sampler.set_epoch(t.state.epoch)  # epoch boundary: the next epoch starts at its beginning
        consumed = t.state.batches_done * t.backend.micro_batch
        return {
            "format_version": ckpt.CKPT_FORMAT,
            "epoch": t.state.epoch,
            "step": t.state.step,
            "batches_done": t.state.batches_done,
            "best_metric": t.state.best_metric,
            "best_step": t.state.best_step,
            "epochs_since_best": t.state.epochs_since_best,
            "bad_steps": t.state.bad_steps,
            "sampler": sampler.state_dict(consumed) if sampler is not None else None,
            "rng": rngs,
            "world_size": t.backend.env.world_size,
            "lr_plan": t.lr_plan.state_dict() if t.lr_plan is not None else None,
            "config": config_to_dict(t.cfg),
            "git_sha": t.meta.get("git_sha", "unknown"),
            "shape": t.meta.get("shape"),
            "preprocess": t.meta.get("preprocess"),
            "affine": t.meta.get("affine"),
            "fingerprint": t.meta.get("fingerprint"),
            "data_identity": t.meta.get("data_identity"),
        }

    def restore_trainer_state(self, stored: dict[str, Any]) -> None:
        """Counters, sampler position, RNG, learning-rate plan; new train.lr/weight_decay of an explicit resume."""
        t = self.t
        s = t.state
        s.epoch, s.step, s.batches_done = int(stored["epoch"]), int(stored["step"]), int(stored["batches_done"])
        s.best_metric = stored.get("best_metric")
        s.best_step = int(stored.get("best_step", -1))
        s.epochs_since_best = int(stored.get("epochs_since_best", 0))
        s.bad_steps = int(stored.get("bad_steps", 0))
        t._clean_until = s.step
        if stored.get("sampler") is not None and t.train_data.sampler is not None:
            t.train_data.sampler.load_state_dict(stored["sampler"])
        rngs = stored.get("rng") or []
        rank = t.backend.env.rank
        if len(rngs) == t.backend.env.world_size:
            ckpt.restore_rng(rngs[rank])
        elif rngs:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: RNG not restored", len(rngs), t.backend.env.world_size)
        self._apply_new_optimisation(((stored.get("config") or {}).get("train") or {}))
        if t.lr_plan is not None:
            if stored.get("lr_plan"):
                t.lr_plan.load_state_dict(stored["lr_plan"])
            if t.lr_plan.total != t.total_steps:
                old = t.lr_plan.total
                t.lr_plan.replan(s.step, t.total_steps)
                log.info("planned steps changed from %d to %d: the %s learning-rate schedule continues from step %d "
                         "without a jump and decays over the remaining steps", old, t.total_steps, t.cfg.train.schedule, s.step)

    def _apply_new_optimisation(self, old: dict[str, Any]) -> None:
        """An explicit resume may change train.lr / weight_decay: the restored optimizer and
        scheduler carry the old ones, so set the new ones (no-op when unchanged)."""
        cfg = self.t.cfg.train
        t = self.t
        groups = t.optimizer.param_groups
        if "lr" in old and old["lr"] != cfg.lr:
            scheduler = getattr(t.backend, "scheduler", None)
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
            factor = t.lr_plan.factor(t.state.step) if t.lr_plan is not None else 1.0
            for g in groups:
                g["initial_lr"], g["lr"] = cfg.lr, cfg.lr * factor
        if "weight_decay" in old and old["weight_decay"] != cfg.weight_decay and groups:
            groups[0]["weight_decay"] = cfg.weight_decay  # group 0 decays; norms and biases (group 1) never

    # ------------------------------------------------------------------ save

    def save(self, is_best: bool = False) -> Path:
        """Checkpoint the current step, update last/best, prune; every rank calls it."""
        t, b, s = self.t, self.t.backend, self.t.state
        path = ckpt.checkpoint_path(self.run_dir, s.step, b.name)
        state = self.trainer_state()
        error: OSError | None = None
        try:
            b.save(path, state, t.model, t.optimizer)
        except OSError as exc:  # disk full, quota, read-only: earlier checkpoints stay as they are
            error = exc
        if not self._agree(error is None):
            if b.name == "deepspeed" and b.is_global_zero:
                import shutil

                shutil.rmtree(path, ignore_errors=True)  # a partial tag folder is never resumed from
            if error is not None:
                raise error
            raise OSError(errno.EIO, "another rank could not write its part of the checkpoint", str(path))
        if b.name == "deepspeed":
            b.barrier()
            if b.is_global_zero:
                ckpt.save_sealed(state, path / "trainer_state.pt")
                write_folder_manifest(path)
                (path / ".complete").touch()
                _write_pointer(self.run_dir / "ds" / "last.txt", path.name)
                if is_best:
                    _write_pointer(self.run_dir / "ds" / "best.txt", path.name)
        elif b.is_global_zero:
            ckpt.link_as(path, "last.pt")
            if is_best:
                ckpt.link_as(path, "best.pt")
        if b.is_global_zero:
            protect = {p for p in (path, self._best_path(), self.resumed_from, self.before_resume) if p is not None}
            ckpt.prune_checkpoints(self.run_dir, b.name, t.cfg.train.keep_last, protect)
        b.barrier()
        self.written.append((s.step, path))
        return path

    def _best_path(self) -> Path | None:
        if self.t.state.best_step < 0:
            return None
        return ckpt.checkpoint_path(self.run_dir, self.t.state.best_step, self.t.backend.name)

    # ------------------------------------------------------------------ resume

    def _read_agreed(self, path: Path) -> tuple[dict[str, Any] | None, str]:
        stored: dict[str, Any] | None = None
        problem = ""
        try:
            stored = self.t.backend.read(path)
        except CheckpointUnreadable as exc:
            problem = str(exc)
        except OSError as exc:
            problem = describe_os_error(exc, path)
        if not self._agree(stored is not None):
            return None, problem or f"{path}: another rank could not read it"
        return stored, ""

    def resume(self, resume: str) -> bool:
        """Continue from a checkpoint (``auto``, ``none`` or a PATH); False when starting fresh.

        Raises:
            ResumeError: the config differs, an explicit checkpoint is unreadable, or the run diverged.
        """
        t, b = self.t, self.t.backend
        explicit = resume not in ("auto", "none")
        if resume == "auto":
            record = read_diverged(self.run_dir)
            if record is not None:
                raise ResumeError(_diverged_refusal(self.run_dir, record))
        candidates = ckpt.find_resume(self.run_dir, b.name, resume)
        for i, path in enumerate(candidates):
            stored, problem = self._read_agreed(path)
            if stored is None:
                if explicit:
                    raise ResumeError(f"{problem}; pass another checkpoint, --resume auto or --resume none")
                (log.warning if b.is_global_zero else log.debug)("skipping unreadable checkpoint: %s", problem)
                continue
            notes = check_compatible(stored, config_to_dict(t.cfg), t.meta.get("data_identity"), path, self.run_dir, explicit)
            try:
                b.apply(stored, path, t.model, t.optimizer)
            except (RuntimeError, KeyError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise ResumeError(f"{path}: does not fit this model and optimizer ({first}); use --resume none or a new --run-dir") from None
            self.restore_trainer_state(stored)
            self.resumed_from = path
            older = [p for p in candidates[i + 1:]] if resume == "auto" else [
                p for s, p in ckpt.list_checkpoints(self.run_dir, b.name) if s < t.state.step]
            self.before_resume = older[0] if older else None
            for note in notes:
                log.info("resume with a changed setting: %s", note)
            self._after_resume(t.state.step, explicit)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, t.state.step, t.state.epoch, t.state.batches_done)
            return True
        if explicit:  # find_resume returned it, so only an unreadable file gets here
            raise ResumeError(f"{resume}: could not be loaded")
        self._after_resume(-1, explicit=resume == "none")
        return False

    def _after_resume(self, step: int, explicit: bool) -> None:
        """Rank 0 tidies the run folder once the resume is accepted (nothing before)."""
        b = self.t.backend
        if b.is_global_zero:
            ckpt.set_aside_newer(self.run_dir, b.name, step)
            if explicit:
                archive_diverged(self.run_dir)
            if self.resumed_from is not None and b.name != "deepspeed" and self.resumed_from.parent == self.run_dir:
                if not (self.run_dir / "last.pt").exists():
                    ckpt.link_as(self.resumed_from, "last.pt")
            save_config(self.t.cfg, self.run_dir / "config.yaml")
        b.barrier()

    # ------------------------------------------------------------------ divergence

    def on_diverged(self, first_bad_after: int) -> None:
        """Prune nothing; record and say which checkpoints to go back to."""
        t = self.t
        clean = [p for s, p in self.written if s <= first_bad_after and p.exists()]
        options = {
            "newest_before_non_finite": str(clean[-1]) if clean else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "before_resume": str(self.before_resume) if self.before_resume else None,
        }
        info = {"step": t.state.step, "bad_steps": t.state.bad_steps, "first_bad_after_step": first_bad_after, "go_back": options}
        if t.backend.is_global_zero:
            write_diverged(self.run_dir, info)
        choices = [v for v in options.values() if v]
        log.error(
            "diverged at step %d (more than train.nan_max=%d non-finite updates); no checkpoint was pruned. Go back with "
            "--resume %s, usually with a lower train.lr, or start over with --resume none; --resume auto refuses until "
            "then (%s)", t.state.step, t.cfg.train.nan_max, " or ".join(dict.fromkeys(choices)) or "none (no checkpoint yet)",
            self.run_dir / DIVERGED_NAME,
        )


def _diverged_refusal(run_dir: Path, record: dict[str, Any]) -> str:
    options = [v for v in (record.get("go_back") or {}).values() if v]
    back = " or ".join(dict.fromkeys(options)) or "an earlier checkpoint"
    return (
        f"{run_dir} diverged at step {record.get('step', '?')} ({run_dir / DIVERGED_NAME}): --resume auto will not restart it; "
        f"go back with --resume {back} (usually with a lower train.lr), or start over with --resume none"
    )


def _write_pointer(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
