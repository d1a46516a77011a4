"""Learning-rate schedule as a function of the step, that survives a change of plan.

Warm-up, then cosine / linear decay to 5 % of ``train.lr`` (or constant). The
decay runs from an anchor ``(step, progress)`` to the planned total: a fresh
run anchors at the end of warm-up with progress 0. When a resume changes the
planned total (``train.epochs`` or ``train.max_steps``), :meth:`LRPlan.replan`
moves the anchor to the resume step with the progress reached there, so the
learning rate continues without a jump and decays over the remaining steps.
Extending a finished run (progress 1) therefore continues at the final learning
rate (5 % of ``train.lr`` for cosine/linear) instead of restarting the decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from brainage_hpc.config import TrainConfig

__all__ = ["LRPlan", "lr_plan_of", "make_scheduler"]

_FLOOR = 0.05


class LRPlan:
    """Learning-rate factor per step; its anchor is saved in every checkpoint."""

    def __init__(self, cfg: TrainConfig, total_steps: int) -> None:
        self.schedule = cfg.schedule
        self.warmup = max(cfg.warmup_steps, 0)
        self.total = max(int(total_steps), 1)
        self.anchor_step = self.warmup
        self.anchor_progress = 0.0

    def progress(self, step: int) -> float:
        """Fraction of the decay done at ``step`` (0 at the anchor's start, 1 at the total)."""
        span = max(self.total - self.anchor_step, 1)
        done = min(max(step - self.anchor_step, 0) / span, 1.0)
        return self.anchor_progress + (1.0 - self.anchor_progress) * done

    def factor(self, step: int) -> float:
        """Multiplier of ``train.lr`` for optimizer step ``step`` (0-based)."""
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        p = self.progress(step)
        if self.schedule == "cosine":
            return _FLOOR + (1 - _FLOOR) * 0.5 * (1 + math.cos(math.pi * p))
        if self.schedule == "linear":
            return max(1.0 - p, _FLOOR)
        return 1.0

    def replan(self, step: int, total_steps: int) -> None:
        """Continue from ``step`` towards a new total without a jump in the learning rate."""
        total_steps = max(int(total_steps), 1)
        if total_steps == self.total:
            return
        if step >= self.warmup:
            self.anchor_progress = self.progress(step)
            self.anchor_step = step
        self.total = total_steps

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "anchor_step": self.anchor_step, "anchor_progress": self.anchor_progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state["total"])
        self.anchor_step = int(state["anchor_step"])
        self.anchor_progress = float(state["anchor_progress"])


def make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, plan: LRPlan | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :class:`LRPlan` (linear warm-up, then cosine / linear decay or constant)."""
    plan = plan or LRPlan(cfg, total_steps)

    def factor(step: int) -> float:
        return plan.factor(step)

    # A plain function: LambdaLR then keeps it out of its state_dict (the plan is saved by the trainer).
    factor.plan = plan  # type: ignore[attr-defined]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_plan_of(scheduler: Any) -> LRPlan | None:
    """The :class:`LRPlan` behind a scheduler made by :func:`make_scheduler` (else None)."""
    for fn in getattr(scheduler, "lr_lambdas", None) or []:
        plan = getattr(fn, "plan", None)
        if isinstance(plan, LRPlan):
            return plan
    return None
