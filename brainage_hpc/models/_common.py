"""Shared pieces of the model zoo: argument checks, geometry, masked losses.

Private module: the public names are re-exported where they belong. Losses here
always run in float32 (inputs are cast with ``.float()``), so models may run
under bf16/fp16 autocast and still report exact losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TASKS",
    "Padding",
    "Task",
    "check_choice",
    "check_class_ages",
    "check_in_shape",
    "check_task",
    "conv_out",
    "count_params",
    "expected_age",
    "finite_age_mask",
    "gaussian_nll",
    "cast_for",
    "classification_outputs",
    "masked_cross_entropy",
    "masked_mean",
    "masked_regression_loss",
    "sex_column",
]

Task = Literal["regress", "classify"]
Padding = Literal["valid", "same"]
TASKS: tuple[str, ...] = ("regress", "classify")


def check_choice(name: str, value: object, options: Sequence[str], owner: str) -> None:
    """Raise ``ValueError`` naming the bad value and the valid options."""
    if value not in options:
        raise ValueError(f"{owner}: {name}={value!r} is not valid. Valid: {', '.join(map(str, options))}")


def check_in_shape(in_shape: Sequence[int], owner: str) -> tuple[int, int, int]:
    """Return ``in_shape`` as a tuple of three positive ints (D, H, W), without the channel."""
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: in_shape must be three ints (D, H, W), got {in_shape!r}") from None
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(
            f"{owner}: in_shape must be three positive ints (D, H, W) without batch and channel, got {in_shape!r}"
        )
    return shape  # type: ignore[return-value]


def check_task(task: str, num_classes: int, owner: str) -> int:
    """Validate the task; return the number of outputs of the prediction head."""
    check_choice("task", task, TASKS, owner)
    if task == "classify":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"{owner}: task='classify' needs num_classes >= 2, got {num_classes!r}")
        return num_classes
    return 1


def check_class_ages(class_ages: Sequence[float] | None, num_classes: int, owner: str) -> Tensor | None:
    """Validate optional per-class representative ages (years); return them as a float32 tensor."""
    if class_ages is None:
        return None
    ages = torch.as_tensor([float(a) for a in class_ages], dtype=torch.float32)
    if ages.numel() != num_classes:
        raise ValueError(
            f"{owner}: class_ages has {ages.numel()} entries but num_classes={num_classes}; "
            "give one age (years) per class"
        )
    return ages


def sex_column(sex: Tensor, like: Tensor) -> Tensor:
    """Sex (B,) as a (B, 1) column with ``like``'s dtype and device, for concatenation."""
    return sex.reshape(-1, 1).to(device=like.device, dtype=like.dtype)


def cast_for(x: Tensor, weight: Tensor) -> Tensor:
    """Cast ``x`` to the dtype of the layer weight it feeds, unless autocast will.

    Under autocast this is a no-op (no bf16->fp32->bf16 copy); without it (fp32 training, or
    DeepSpeed bf16 where the weights themselves are bf16) it makes dtypes match.
    """
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def finite_age_mask(age: Tensor) -> tuple[Tensor, Tensor]:
    """Return (mask (B,) bool of known ages, ages (B,) float32 with unknown ones set to 0)."""
    age = age.float().reshape(-1)
    mask = torch.isfinite(age)
    return mask, torch.where(mask, age, torch.zeros_like(age))


def masked_mean(per_sample: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_sample`` (B,) over ``mask``; 0 (still in the graph) when the mask is empty."""
    per_sample = torch.where(mask, per_sample, torch.zeros_like(per_sample))
    return per_sample.sum() / mask.sum().clamp(min=1)


def masked_regression_loss(pred: Tensor, age: Tensor, kind: Literal["l1", "mse"]) -> Tensor:
    """L1 or MSE in years over the samples whose age is finite.

    Args:
        pred: predicted age, (B,), years.
        age: true age, (B,), years; NaN where unknown.
        kind: ``"l1"`` or ``"mse"``.

    Returns:
        Scalar float32 loss; 0 but connected to ``pred`` when no age is known.
    """
    mask, target = finite_age_mask(age)
    diff = pred.float().reshape(-1) - target
    per_sample = diff.abs() if kind == "l1" else diff.square()
    return masked_mean(per_sample, mask)


def gaussian_nll(mean: Tensor, logvar: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked Gaussian negative log-likelihood, including the 0.5·log(2π) constant.

    Args:
        mean: predicted mean, (B,).
        logvar: predicted log-variance, (B,); clamped to [-8, 8] for stability.
        target: target, (B,), already finite (masked entries may hold any finite value).
        mask: (B,) bool, which samples count.

    Returns:
        Scalar float32 loss (may be negative once the variance is small).
    """
    logvar = logvar.float().clamp(-8.0, 8.0)
    nll = 0.5 * (logvar + (target - mean.float()).square() * torch.exp(-logvar) + math.log(2 * math.pi))
    return masked_mean(nll, mask)


def masked_cross_entropy(logits: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy over samples with a label >= 0 (negative labels mean unknown).

    Args:
        logits: (B, K).
        label: (B,) int64 class index.

    Returns:
        Scalar float32 loss; 0 but connected to ``logits`` when no label is known.
    """
    label = label.reshape(-1).long()
    mask = label >= 0
    per_sample = F.cross_entropy(logits.float(), label.clamp(min=0), reduction="none")
    return masked_mean(per_sample, mask)


def expected_age(logits: Tensor, ages: Tensor) -> Tensor:
    """Expected age (B,) in years: softmax(logits) (B, K) weighted by per-class ages (K,)."""
    probs = torch.softmax(logits.float(), dim=1)
    return probs @ ages.to(device=probs.device, dtype=probs.dtype)


def classification_outputs(logits: Tensor, batch: dict[str, Tensor], class_ages: Tensor | None) -> dict[str, Tensor]:
    """The output dict of a classification head, the same for every model.

    Args:
        logits: (B, K).
        batch: the input batch; its ``label`` (B,) int64 (negative = unknown) gives the loss.
        class_ages: per-class ages (K,) in years, or ``None``.

    Returns:
        ``logits``; ``pred_age`` (B,) when ``class_ages`` is given; ``loss`` and ``loss/cls``
        when the batch has labels.
    """
    result: dict[str, Tensor] = {"logits": logits}
    if class_ages is not None:
        result["pred_age"] = expected_age(logits, class_ages)
    if "label" in batch:
        loss = masked_cross_entropy(logits, batch["label"])
        result["loss/cls"] = loss
        result["loss"] = loss
    return result


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling along one axis (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
