"""Validation metrics accumulated as device tensors and all-reduced once.

Sums, not per-sample lists, cross the network: for regression
(n, |e|, e^2, y, y^2, p, p^2, y*p) and for classification a confusion matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["ValAccumulator", "confusion_metrics"]


def confusion_metrics(cm: torch.Tensor) -> dict[str, float]:
    """Accuracy, micro/macro F1 and balanced accuracy from a (K, K) confusion matrix (rows = truth)."""
    cm = cm.double()
    total = cm.sum().clamp_min(1)
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = tp / predicted.clamp_min(1)
    recall = tp / support.clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = support > 0
    acc = float(tp.sum() / total)
    return {
        "accuracy": acc,
        "f1_micro": acc,  # single-label: micro-F1 equals accuracy
        "f1_macro": float(f1[present | (predicted > 0)].mean()) if (present | (predicted > 0)).any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
    }


class ValAccumulator:
    """Accumulate one validation pass; ``compute`` all-reduces through the backend."""

    def __init__(self, task: str, device: torch.device) -> None:
        self.task = task
        self.device = device
        self.n_classes = {"classify4": 4, "classify2": 2}.get(task, 0)
        self.loss_keys: list[str] = []
        self.loss_sums = torch.zeros(0, device=device)
        self.reg = torch.zeros(9, device=device, dtype=torch.float64)
        self.cm = torch.zeros(max(self.n_classes, 1), max(self.n_classes, 1), device=device, dtype=torch.float64)

    def add(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        n = batch["image"].shape[0]
        parts = {k: v for k, v in out.items() if k == "loss" or k.startswith("loss/")}
        if not self.loss_keys:
            self.loss_keys = sorted(parts)
            self.loss_sums = torch.zeros(len(self.loss_keys) + 1, device=self.device, dtype=torch.float64)
        vals = [parts[k].detach().double().reshape(()) * n for k in self.loss_keys]
        self.loss_sums += torch.stack([torch.tensor(float(n), device=self.device, dtype=torch.float64), *vals])
        if "pred_age" in out and "age" in batch:
            y = batch["age"].double()
            p = out["pred_age"].detach().double().reshape(-1)
            ok = torch.isfinite(y) & torch.isfinite(p)
            y, p = y[ok], p[ok]
            e = p - y
            self.reg += torch.stack([ok.sum().double(), e.abs().sum(), (e * e).sum(), y.sum(), (y * y).sum(), p.sum(), (p * p).sum(), (y * p).sum(), torch.zeros((), device=self.device, dtype=torch.float64)])
        if self.n_classes and "logits" in out:
            pred = out["logits"].detach().argmax(1)
            idx = batch["label"].long() * self.n_classes + pred
            self.cm += torch.bincount(idx, minlength=self.n_classes**2).reshape(self.n_classes, self.n_classes).double()

    def compute(self, backend: Any) -> dict[str, float]:
        flat = torch.cat([self.loss_sums, self.reg, self.cm.reshape(-1)])
        flat = backend.all_reduce(flat, "sum")
        k = len(self.loss_sums)
        loss_sums, reg, cm = flat[:k], flat[k : k + 9], flat[k + 9 :].reshape(self.cm.shape)
        out: dict[str, float] = {}
        if k:
            n = max(float(loss_sums[0]), 1.0)
            for key, v in zip(self.loss_keys, loss_sums[1:].tolist()):
                out[f"val/{key}"] = v / n
        m = float(reg[0])
        if m > 0:
            sy, syy, sp, spp, syp = (float(x) for x in reg[3:8])
            ss_tot = syy - sy * sy / m
            out["val/mae"] = float(reg[1]) / m
            out["val/rmse"] = math.sqrt(float(reg[2]) / m)
            out["val/r2"] = 1 - float(reg[2]) / ss_tot if ss_tot > 0 else math.nan
            cov = syp - sy * sp / m
            var_p = spp - sp * sp / m
            out["val/pearson_r"] = cov / math.sqrt(ss_tot * var_p) if ss_tot > 0 and var_p > 0 else math.nan
        if self.n_classes and cm.sum() > 0:
            out.update({f"val/{k2}": v for k2, v in confusion_metrics(cm).items()})
        return out
