"""Augmentation: MONAI dict transforms (CPU, per volume) and a batched device path.

Two ways to augment a training volume, chosen by ``AugmentConfig.device``:

* ``"cpu"``: :func:`train_transforms`, a MONAI ``Compose`` run by DataLoader
  workers on one channel-first volume ``{"image": (1, D, H, W)}``. Flips and the
  affine are lazy (MONAI fuses them into a single resampling).
* ``"gpu"``: :class:`DeviceAugment`, run by the trainer on a whole batch
  ``{"image": (B, 1, D, H, W)}`` after it has been moved to the device, so no CPU
  worker is on the hot path. It uses only torch ops and also runs on the CPU.

Both keep the shape and return float32. Only random, load-time steps live here;
everything deterministic was done once by preprocessing and stored in the shards.
Axis 0 of (D, H, W) is left-right (shards are RAS canonical), hence the default
``flip_axes=[0]``: a mirrored brain is still a plausible brain, an upside-down
one is not.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    EnsureTyped,
    Rand3DElasticd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from brainage_hpc.config import AugmentConfig

__all__ = ["DeviceAugment", "eval_transforms", "train_transforms"]

_KEYS = ("image",)
# Elastic deformation: smoothing sigma (voxels) and magnitude of the MONAI field.
# With these ranges the displacement is about 0.4 voxel on average and at most about
# 2 voxels (measured on a 64^3 ramp): anatomy stays plausible.
_ELASTIC_SIGMA = (5.0, 8.0)
_ELASTIC_MAGNITUDE = (50.0, 150.0)


def _check_aug(aug: AugmentConfig) -> None:
    probs = {
        "flip_prob": aug.flip_prob,
        "affine_prob": aug.affine_prob,
        "elastic_prob": aug.elastic_prob,
        "intensity_prob": aug.intensity_prob,
        "noise_prob": aug.noise_prob,
    }
    for name, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"data.augment.{name}={p} must be a probability in [0, 1]")
    for name in ("rotate_deg", "scale", "translate_vox", "intensity_shift", "intensity_scale", "noise_std"):
        if getattr(aug, name) < 0:
            raise ValueError(f"data.augment.{name}={getattr(aug, name)} must be >= 0")
    bad = [a for a in aug.flip_axes if a not in (0, 1, 2)]
    if bad:
        raise ValueError(f"data.augment.flip_axes={list(aug.flip_axes)}: axes must be 0, 1 or 2 (of D, H, W)")


def eval_transforms() -> Compose:
    """Deterministic transform: ``{"image": (1, D, H, W)}`` -> plain float32 tensor, unchanged values."""
    return Compose([EnsureTyped(keys=_KEYS, dtype=torch.float32, track_meta=False)])


def train_transforms(aug: AugmentConfig, seed: int | None = None) -> Compose:
    """Random training transforms built from ``aug``; eval transforms when ``aug.enabled`` is false.

    Order: flips and affine (lazy, fused into one resampling), optional elastic
    deformation, intensity scale and shift, Gaussian noise.

    Args:
        aug: the ``data.augment`` section of the run config.
        seed: when given, ``set_random_state(seed)`` so the sequence of outputs
            is reproducible; DataLoader workers reseed it per item (see ``loader``).

    Returns:
        A ``Compose`` mapping ``{"image": (1, D, H, W)}`` to the same keys with a
        plain float32 tensor of the same shape; other keys pass through.

    Example:
        >>> t = train_transforms(AugmentConfig(), seed=0)
        >>> t({"image": torch.zeros(1, 8, 8, 8)})["image"].shape
        torch.Size([1, 8, 8, 8])
    """
    _check_aug(aug)
    if not aug.enabled:
        return eval_transforms()
    steps: list[Any] = [EnsureTyped(keys=_KEYS, dtype=torch.float32)]
    for axis in aug.flip_axes:
        steps.append(RandFlipd(keys=_KEYS, prob=aug.flip_prob, spatial_axis=axis, lazy=True))
    if aug.affine_prob > 0:
        steps.append(
            RandAffined(
                keys=_KEYS,
                prob=aug.affine_prob,
                rotate_range=[math.radians(aug.rotate_deg)] * 3,
                scale_range=[aug.scale] * 3,
                translate_range=[aug.translate_vox] * 3,
                mode="bilinear",
                padding_mode="zeros",
                lazy=True,
            )
        )
    if aug.elastic_prob > 0:
        steps.append(
            Rand3DElasticd(
                keys=_KEYS,
                sigma_range=_ELASTIC_SIGMA,
                magnitude_range=_ELASTIC_MAGNITUDE,
                prob=aug.elastic_prob,
                mode="bilinear",
                padding_mode="zeros",
            )
        )
    if aug.intensity_scale > 0:
        steps.append(RandScaleIntensityd(keys=_KEYS, factors=aug.intensity_scale, prob=aug.intensity_prob))
    if aug.intensity_shift > 0:
        steps.append(RandShiftIntensityd(keys=_KEYS, offsets=aug.intensity_shift, prob=aug.intensity_prob))
    if aug.noise_std > 0:
        steps.append(RandGaussianNoised(keys=_KEYS, prob=aug.noise_prob, std=aug.noise_std))
    steps.append(EnsureTyped(keys=_KEYS, dtype=torch.float32, track_meta=False))
    compose = Compose(steps, lazy=True)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose


class DeviceAugment:
    """Batched random augmentation on whatever device the batch lives on.

    The same augmentations as :func:`train_transforms` (elastic excepted), drawn
    independently per sample: flips along ``flip_axes``, a small affine
    (rotation about the three axes, isotropic-per-axis scaling, translation in
    voxels) by one ``affine_grid``/``grid_sample`` over only the samples that
    drew it, intensity scale and shift, and Gaussian noise. All random numbers
    come from a ``torch.Generator`` on the batch's device, seeded with ``seed``,
    so equal seeds give equal outputs and no host synchronisation is needed.

    Args:
        aug: the ``data.augment`` section of the run config.
        seed: seed of the device generator (created at the first call).

    Example:
        >>> da = DeviceAugment(AugmentConfig(), seed=0)
        >>> da({"image": torch.zeros(2, 1, 8, 8, 8)})["image"].shape
        torch.Size([2, 1, 8, 8, 8])
    """

    def __init__(self, aug: AugmentConfig, seed: int = 0) -> None:
        _check_aug(aug)
        self.aug = aug
        self.seed = int(seed)
        self._gen: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
            if self._pending_state is not None:
                self._gen.set_state(self._pending_state)
                self._pending_state = None
        return self._gen

    def state_dict(self) -> dict[str, Any]:
        """Generator state, for exact resume (store it in the checkpoint)."""
        state = self._gen.get_state() if self._gen is not None else self._pending_state
        return {"seed": self.seed, "rng": None if state is None else state.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when the generator is next used."""
        self.seed = int(state["seed"])
        self._gen = None
        self._pending_state = state.get("rng")

    def _uniform(self, n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=g, device=device) * (hi - lo) + lo

    def _affine_theta(self, n: int, spatial: tuple[int, int, int], g: torch.Generator, dev: torch.device) -> torch.Tensor:
        """Random ``affine_grid`` matrices, (n, 3, 4), in normalised (x=W, y=H, z=D) coordinates."""
        a = self.aug
        rot = math.radians(a.rotate_deg)
        angles = self._uniform(3 * n, -rot, rot, g, dev).view(n, 3)  # (n, 3)
        scales = 1.0 + self._uniform(3 * n, -a.scale, a.scale, g, dev).view(n, 3)  # (n, 3)
        shift_vox = self._uniform(3 * n, -a.translate_vox, a.translate_vox, g, dev).view(n, 3)  # (n, 3)
        c, s = torch.cos(angles), torch.sin(angles)
        one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
        rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(n, 3, 3)
        ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(n, 3, 3)
        rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(n, 3, 3)
        # output voxel -> input voxel: rotate, then zoom (scale > 1 magnifies)
        m_vox = rz @ ry @ rx @ torch.diag_embed(1.0 / scales)  # (n, 3, 3)
        half = torch.tensor([spatial[2], spatial[1], spatial[0]], device=dev, dtype=m_vox.dtype) / 2.0  # (W, H, D)
        # normalised coords: n = v / half  =>  M_norm = S^-1 M_vox S, t_norm = S^-1 t_vox
        m_norm = m_vox * half.view(1, 1, 3) / half.view(1, 3, 1)
        t_norm = shift_vox / half.view(1, 3)
        return torch.cat([m_norm, t_norm.unsqueeze(-1)], dim=2)  # (n, 3, 4)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Augment ``batch["image"]`` in a new dict.

        Args:
            batch: dict with ``"image"``, (B, 1, D, H, W), floating point, on any
                device; other keys are passed through untouched.

        Returns:
            A shallow copy of ``batch`` whose ``"image"`` is float32, (B, 1, D, H, W).
        """
        x = batch["image"]
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DeviceAugment expects batch['image'] as a (B, C, D, H, W) tensor, got {shape}")
        out = dict(batch)
        if not self.aug.enabled:
            out["image"] = x.float()
            return out
        a, dev = self.aug, x.device
        g = self._generator(dev)
        x = x.float()
        b = x.shape[0]
        for axis in a.flip_axes:
            flip = (torch.rand(b, generator=g, device=dev) < a.flip_prob).view(b, 1, 1, 1, 1)
            x = torch.where(flip, x.flip(2 + axis), x)
        if a.affine_prob > 0:
            chosen = torch.rand(b, generator=g, device=dev) < a.affine_prob
            spatial = (int(x.shape[2]), int(x.shape[3]), int(x.shape[4]))
            theta = self._affine_theta(b, spatial, g, dev)  # drawn for all: fixed RNG consumption
            idx = chosen.nonzero().squeeze(1)
            if idx.numel() > 0:  # host sync: only to skip an empty grid_sample
                sub = x.index_select(0, idx)
                grid = F.affine_grid(theta.index_select(0, idx), list(sub.shape), align_corners=False)
                sub = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                x = x.index_copy(0, idx, sub)
        if a.intensity_scale > 0 or a.intensity_shift > 0:
            hit = (torch.rand(b, generator=g, device=dev) < a.intensity_prob).float().view(b, 1, 1, 1, 1)
            factor = self._uniform(b, -a.intensity_scale, a.intensity_scale, g, dev).view(b, 1, 1, 1, 1)
            offset = self._uniform(b, -a.intensity_shift, a.intensity_shift, g, dev).view(b, 1, 1, 1, 1)
            x = x * (1.0 + hit * factor) + hit * offset
        if a.noise_std > 0:
            hit = (torch.rand(b, generator=g, device=dev) < a.noise_prob).float().view(b, 1, 1, 1, 1)
            std = self._uniform(b, 0.0, a.noise_std, g, dev).view(b, 1, 1, 1, 1)
            noise = torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype)
            x = x + hit * std * noise
        out["image"] = x
        return out

    def __repr__(self) -> str:
        return f"DeviceAugment(seed={self.seed}, aug={self.aug})"
