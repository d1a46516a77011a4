"""The seed 3D CNN (``S500MRI_clf``), generalised in width, depth, padding and target.

Seed layout (128³ input, ``padding="valid"``, ``depth=4``, ``width=8``)::

    block i (i = 0..3), out = width·2^i, hidden = out // 2:
        Conv3d(in→hidden, k3) → BN → ReLU → Dropout3d(p) → Conv3d(hidden→out, k3) → BN → ReLU → MaxPool3d(2)
    128 → 62 → 29 → 12 → 4 (spatial), channels 1 → 8 → 16 → 32 → 64
    head: Conv3d(64→128, kernel = remaining spatial size) → RReLU → flatten, concat sex → Linear → K (or 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from brainage_hpc.models._common import (
    Padding,
    Task,
    cast_for,
    check_choice,
    check_class_ages,
    check_in_shape,
    check_task,
    classification_outputs,
    conv_out,
    masked_regression_loss,
    sex_column,
)

__all__ = ["CNN3d", "cnn3d_feature_shape"]


def _block_out(size: int, padding: Padding) -> int:
    pad = 1 if padding == "same" else 0
    size = conv_out(size, 3, padding=pad)
    size = conv_out(size, 3, padding=pad)
    return size // 2 if size >= 1 else 0


def cnn3d_feature_shape(in_shape: Sequence[int], depth: int, padding: Padding) -> list[tuple[int, int, int]]:
    """Spatial shape after each block, starting with ``in_shape``; entries may hit 0 when it does not fit."""
    shapes = [tuple(int(s) for s in in_shape)]
    for _ in range(depth):
        shapes.append(tuple(_block_out(s, padding) for s in shapes[-1]))
    return shapes  # type: ignore[return-value]


def _max_depth(in_shape: Sequence[int], padding: Padding) -> int:
    depth = 0
    while min(cnn3d_feature_shape(in_shape, depth + 1, padding)[-1]) >= 1 and depth < 32:
        depth += 1
    return depth


class _ConvBlock(nn.Sequential):
    """Conv3d k3 → BN → ReLU → Dropout3d → Conv3d k3 → BN → ReLU → MaxPool3d(2)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, padding: Padding) -> None:
        hidden = max(out_channels // 2, 1)
        pad = 1 if padding == "same" else 0
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, hidden, kernel_size=3, padding=pad)
        self.bn1 = nn.BatchNorm3d(hidden)
        self.relu1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout3d(dropout)
        self.conv2 = nn.Conv3d(hidden, out_channels, kernel_size=3, padding=pad)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d(2)


class CNN3d(nn.Module):
    """Seed 3D CNN for brain age: regression in years or classification into age bins.

    Args:
        in_shape: input spatial shape (D, H, W), without batch and channel.
        task: ``"regress"`` (one output, age in years) or ``"classify"`` (``num_classes`` logits).
        num_classes: number of classes for ``task="classify"`` (>= 2); ignored for ``"regress"``.
        width: output channels of the first block; block i has ``width·2^i`` (seed: 8).
        depth: number of conv blocks (seed: 4).
        dropout: ``Dropout3d`` probability inside each block (seed: 0.3).
        padding: ``"valid"`` (seed, each block loses 4 voxels before pooling) or ``"same"``.
        head_channels: channels of the head convolution; default twice the last block's.
        loss: regression loss, ``"l1"`` or ``"mse"`` (years); classification always uses cross-entropy.
        age_center: regression output offset in years (the head predicts ``center + scale·y``).
        age_scale: regression output scale in years.
        class_ages: optional representative age (years) per class; with it a classifier also
            returns ``pred_age`` = the expected age under the softmax.

    Raises:
        ValueError: bad task/padding/loss, or a geometry where the feature map collapses.

    Examples::

        >>> import torch
        >>> net = CNN3d(in_shape=(32, 32, 32), task="regress", num_classes=1, depth=3, padding="same")
        >>> batch = {"image": torch.randn(2, 1, 32, 32, 32), "sex": torch.tensor([0.0, 1.0]),
        ...          "age": torch.tensor([25.0, float("nan")])}
        >>> out = net(batch)
        >>> out["pred_age"].shape, out["loss"].shape
        (torch.Size([2]), torch.Size([]))
    """

    #: module whose output are the penultimate features (the head convolution's activation (B, head)); read by
    #: :func:`brainage_hpc.models.features.forward_with_features` with a forward hook.
    penultimate = "head_act"

    class_ages: Tensor | None

    def __init__(
        self,
        in_shape: Sequence[int],
        task: Task = "regress",
        num_classes: int = 1,
        *,
        width: int = 8,
        depth: int = 4,
        dropout: float = 0.3,
        padding: Padding = "valid",
        head_channels: int | None = None,
        loss: Literal["l1", "mse"] = "l1",
        age_center: float = 29.0,
        age_scale: float = 4.0,
        class_ages: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        owner = "CNN3d"
        self.in_shape = check_in_shape(in_shape, owner)
        n_out = check_task(task, num_classes, owner)
        check_choice("padding", padding, ("valid", "same"), owner)
        check_choice("loss", loss, ("l1", "mse"), owner)
        if width < 1 or depth < 1:
            raise ValueError(f"{owner}: width and depth must be >= 1, got width={width}, depth={depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")
        if age_scale <= 0:
            raise ValueError(f"{owner}: age_scale must be > 0 (years), got {age_scale}")
        shapes = cnn3d_feature_shape(self.in_shape, depth, padding)
        if min(shapes[-1]) < 1:
            fits = _max_depth(self.in_shape, padding)
            same_fits = min(cnn3d_feature_shape(self.in_shape, depth, "same")[-1]) >= 1
            hints = []
            if padding == "valid" and same_fits:
                hints.append("padding='same'")
            if fits >= 1:
                hints.append(f"depth<={fits}")
            hint = " or ".join(hints) if hints else "a larger in_shape"
            raise ValueError(
                f"{owner}: in_shape={self.in_shape} with depth={depth} and padding='{padding}' collapses the "
                f"feature map (spatial shapes per block: {' -> '.join(map(str, shapes))}). Use {hint}."
            )

        self.task = task
        self.num_classes = n_out
        self.loss_kind = loss
        self.age_center = float(age_center)
        self.age_scale = float(age_scale)
        ages = check_class_ages(class_ages, n_out, owner) if task == "classify" else None
        self.register_buffer("class_ages", ages, persistent=False)

        blocks: list[nn.Module] = []
        in_ch = 1
        for i in range(depth):
            out_ch = width * 2**i
            blocks.append(_ConvBlock(in_ch, out_ch, dropout, padding))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.feature_shape: tuple[int, int, int] = shapes[-1]
        head = head_channels if head_channels is not None else 2 * in_ch
        self.head_conv = nn.Conv3d(in_ch, head, kernel_size=self.feature_shape)
        self.head_act = nn.RReLU()
        self.fc = nn.Linear(head + 1, n_out)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Predict and, when targets are in the batch, compute the loss.

        Args:
            batch: ``image`` (B, 1, D, H, W) z-scored; ``sex`` (B,) 0=F, 1=M; optional ``age`` (B,)
                years (NaN = unknown) for ``task="regress"``; optional ``label`` (B,) int64 for
                ``task="classify"`` (negative = unknown).

        Returns:
            ``pred_age`` (B,) years (regress, or classify with ``class_ages``); ``logits`` (B, K)
            (classify); with targets also ``loss`` and ``loss/age`` (regress) or ``loss/cls``
            (classify), float32 scalars.
        """
        x = cast_for(batch["image"], self.head_conv.weight)
        x = self.features(x)  # (B, C, d, h, w)
        x = self.head_act(self.head_conv(x)).flatten(1)  # (B, head)
        x = torch.cat([x, sex_column(batch["sex"], x)], dim=1)  # (B, head + 1)
        out = self.fc(x)  # (B, K) or (B, 1)

        result: dict[str, Tensor] = {}
        if self.task == "regress":
            pred = out[:, 0].float() * self.age_scale + self.age_center  # (B,) years
            result["pred_age"] = pred
            if "age" in batch:
                loss = masked_regression_loss(pred, batch["age"], self.loss_kind)
                result["loss/age"] = loss
                result["loss"] = loss
        else:
            result.update(classification_outputs(out, batch, self.class_ages))
        return result
