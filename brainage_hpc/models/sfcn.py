"""Simple Fully Convolutional Network (SFCN; Peng et al., Med. Image Anal. 2021).

Layout (160×192×160, default channels)::

    5 × [Conv3d k3 pad1 → BN → MaxPool3d(2) → ReLU]   channels 32, 64, 128, 256, 256
    Conv3d 1³ → 64 → BN → ReLU
    AdaptiveAvgPool3d(1) → Dropout(0.5) → Conv3d 1³ → n bins

Regression is classification over 1-year age bins: the target is a soft label
(a Gaussian of width ``sigma`` integrated over each bin), the loss is
KL(target ‖ softmax), and the prediction is the expectation over bin centres.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from brainage_hpc.models._common import (
    Task,
    cast_for,
    check_class_ages,
    check_in_shape,
    check_task,
    classification_outputs,
    expected_age,
    finite_age_mask,
    masked_mean,
)

__all__ = ["SFCN", "soft_age_labels"]


def soft_age_labels(age: Tensor, edges: Tensor, sigma: float) -> Tensor:
    """Soft labels: N(age, sigma²) integrated over each bin, renormalised.

    Ages outside the bin range are clamped to it first, so every row sums to 1.

    Args:
        age: (B,) years, finite.
        edges: (K + 1,) increasing bin edges in years.
        sigma: Gaussian standard deviation in years (> 0).

    Returns:
        (B, K) float32 probabilities.

    Example:
        >>> p = soft_age_labels(torch.tensor([25.5]), torch.arange(20.0, 41.0), sigma=1.0)
        >>> p.shape, round(float(p.sum()), 5), int(p.argmax())
        (torch.Size([1, 20]), 1.0, 5)
    """
    age = age.float().reshape(-1, 1).clamp(float(edges[0]), float(edges[-1]))
    cdf = torch.special.ndtr((edges.float().reshape(1, -1) - age) / sigma)  # (B, K + 1)
    mass = (cdf[:, 1:] - cdf[:, :-1]).clamp(min=0.0)  # (B, K)
    return mass / mass.sum(dim=1, keepdim=True).clamp(min=1e-12)


class SFCN(nn.Module):
    """SFCN brain-age network with soft-label (regress) or hard-label (classify) output.

    ``pred_age`` for ``task="regress"`` is the expected age over the bins. The network
    does not use ``sex`` (as in the paper).

    Args:
        in_shape: input spatial shape (D, H, W); each side must be >= 2^(len(channels) - 1).
        task: ``"regress"`` (age bins from ``age_min``..``age_max``) or ``"classify"``.
        num_classes: classes for ``task="classify"`` (>= 2); ignored for ``"regress"``.
        channels: conv channels; all but the last are k3 blocks with pooling, the last is
            the 1³ conv (paper: 32, 64, 128, 256, 256, 64).
        dropout: dropout before the output conv (paper: 0.5).
        age_min: lower edge of the first age bin, years.
        age_max: upper edge of the last age bin, years.
        bin_width: bin width in years (paper: 1).
        sigma: soft-label Gaussian standard deviation in years (paper: 1).
        class_ages: optional representative age (years) per class for ``task="classify"``;
            with it a classifier also returns ``pred_age``.

    Raises:
        ValueError: bad task, bins, channels, or an input too small for the pooling stages.

    Examples::

        >>> import torch
        >>> net = SFCN(in_shape=(32, 32, 32), task="regress", num_classes=1, channels=(4, 8, 8, 8, 8, 4))
        >>> out = net({"image": torch.randn(2, 1, 32, 32, 32), "sex": torch.zeros(2),
        ...            "age": torch.tensor([24.0, 33.5])})
        >>> out["pred_age"].shape, out["age_logits"].shape, sorted(k for k in out if k.startswith("loss"))
        (torch.Size([2]), torch.Size([2, 20]), ['loss', 'loss/age'])
    """

    #: module whose output are the penultimate features (the global average pool (B, C)); read by
    #: :func:`brainage_hpc.models.features.forward_with_features` with a forward hook.
    penultimate = "pool"

    class_ages: Tensor | None
    bin_edges: Tensor
    bin_centers: Tensor

    def __init__(
        self,
        in_shape: Sequence[int],
        task: Task = "regress",
        num_classes: int = 1,
        *,
        channels: Sequence[int] = (32, 64, 128, 256, 256, 64),
        dropout: float = 0.5,
        age_min: float = 20.0,
        age_max: float = 40.0,
        bin_width: float = 1.0,
        sigma: float = 1.0,
        class_ages: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        owner = "SFCN"
        self.in_shape = check_in_shape(in_shape, owner)
        n_cls = check_task(task, num_classes, owner)
        channels = [int(c) for c in channels]
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"{owner}: channels needs >= 2 positive entries (k3 blocks..., 1³ conv), got {channels}")
        n_pool = len(channels) - 1
        if min(self.in_shape) < 2**n_pool:
            fits = min(self.in_shape).bit_length() - 1  # pooling stages that keep every side >= 1
            hint = f"at most {fits + 1} channels entries" if fits >= 1 else "a larger in_shape"
            raise ValueError(
                f"{owner}: in_shape={self.in_shape} is too small for {n_pool} pooling stages (channels={channels}; "
                f"each side must be >= {2**n_pool}). Use {hint}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")
        self.task = task
        if task == "regress":
            if bin_width <= 0 or sigma <= 0 or age_max <= age_min:
                raise ValueError(
                    f"{owner}: need age_min < age_max, bin_width > 0 and sigma > 0; got age_min={age_min}, "
                    f"age_max={age_max}, bin_width={bin_width}, sigma={sigma}"
                )
            n_bins = round((age_max - age_min) / bin_width)
            if abs(n_bins * bin_width - (age_max - age_min)) > 1e-6 * bin_width:
                raise ValueError(
                    f"{owner}: (age_max - age_min) = {age_max - age_min} is not a multiple of bin_width={bin_width}"
                )
            edges = age_min + bin_width * torch.arange(n_bins + 1, dtype=torch.float32)
            self.register_buffer("bin_edges", edges, persistent=False)
            self.register_buffer("bin_centers", 0.5 * (edges[1:] + edges[:-1]), persistent=False)
            self.sigma = float(sigma)
            n_out = n_bins
            self.register_buffer("class_ages", None, persistent=False)
        else:
            n_out = n_cls
            self.register_buffer("class_ages", check_class_ages(class_ages, n_cls, owner), persistent=False)
        self.num_outputs = n_out

        layers: list[nn.Module] = []
        in_ch = 1
        for ch in channels[:-1]:
            layers.append(
                nn.Sequential(
                    nn.Conv3d(in_ch, ch, kernel_size=3, padding=1),
                    nn.BatchNorm3d(ch),
                    nn.MaxPool3d(2),
                    nn.ReLU(inplace=True),
                )
            )
            in_ch = ch
        layers.append(
            nn.Sequential(
                nn.Conv3d(in_ch, channels[-1], kernel_size=1), nn.BatchNorm3d(channels[-1]), nn.ReLU(inplace=True)
            )
        )
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv3d(channels[-1], n_out, kernel_size=1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Predict and, when targets are in the batch, compute the loss.

        Args:
            batch: ``image`` (B, 1, D, H, W) z-scored; ``sex`` (B,) (unused); optional ``age`` (B,)
                years (NaN = unknown) for ``task="regress"``; optional ``label`` (B,) int64
                (negative = unknown) for ``task="classify"``.

        Returns:
            regress: ``pred_age`` (B,) years, ``age_logits`` (B, n_bins); with ``age`` also ``loss`` and
            ``loss/age`` (KL to the soft label). classify: ``logits`` (B, K) (+ ``pred_age`` with
            ``class_ages``); with ``label`` also ``loss`` and ``loss/cls`` (cross-entropy).
        """
        x = cast_for(batch["image"], self.classifier.weight)
        x = self.features(x)  # (B, C, d, h, w)
        x = self.dropout(self.pool(x))  # (B, C, 1, 1, 1)
        logits = self.classifier(x).flatten(1)  # (B, K)

        result: dict[str, Tensor] = {}
        if self.task == "regress":
            result["age_logits"] = logits
            result["pred_age"] = expected_age(logits, self.bin_centers)
            if "age" in batch:
                mask, age = finite_age_mask(batch["age"])
                target = soft_age_labels(age, self.bin_edges, self.sigma)  # (B, K)
                log_q = torch.log_softmax(logits.float(), dim=1)
                kl = (torch.xlogy(target, target) - target * log_q).sum(dim=1)  # (B,)
                loss = masked_mean(kl, mask)
                result["loss/age"] = loss
                result["loss"] = loss
        else:
            result.update(classification_outputs(logits, batch, self.class_ages))
        return result
