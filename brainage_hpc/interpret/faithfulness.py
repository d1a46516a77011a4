"""Faithfulness of attribution maps: agreement with a known truth, and perturbation curves.

Two kinds of evidence, because a pretty map proves nothing:

* with a truth map (the generator's age effect mapped to the shard grid, or
  ``|Pearson r|`` per voxel of intensity vs age over the train split): *enrichment*,
  the share of map mass in the top-10 % truth voxels divided by 0.1 (1 = chance),
  and Spearman's rho between map and truth, both inside the brain mask;
* on any data: deletion / insertion curves (Samek et al. 2017; Petsiuk et al. 2018).
  Voxels are replaced by the background value in the map's order, most important
  first (deletion) or the brain is built up from the background in that order
  (insertion). The *area over the perturbation curve* (AOPC) is, for deletion, the
  mean |change of predicted age| over the steps and, for insertion, the mean share of
  the blank-vs-full gap already closed (in years); higher = more faithful for both. The
  same deletion with a random order gives the chance level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["TOP_FRACTION", "brain_mask", "enrichment", "perturbation_curves", "spearman", "truth_from_correlation"]

TOP_FRACTION = 0.10


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shape {tuple(a.shape)} does not match the map's {tuple(b.shape)}")


def brain_mask(images: np.ndarray, background: float | None = None) -> np.ndarray:
    """Voxels that differ from the background in any subject.

    Args:
        images: (N, D, H, W) shard volumes (z-scored; the background is one constant).
        background: background value; default the value of the corner voxel of the first volume.

    Returns:
        (D, H, W) bool mask.
    """
    bg = float(images[0, 0, 0, 0]) if background is None else float(background)
    return (np.abs(images - bg) > 1e-3).any(axis=0)


def truth_from_correlation(images: np.ndarray, ages: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``|Pearson r|`` per voxel between intensity and age (0 outside the mask or where constant).

    Args:
        images: (N, D, H, W) volumes of the *train* split (never the subjects explained).
        ages: (N,) years.
        mask: (D, H, W) bool; default all voxels.
    """
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    y = np.asarray(ages, dtype=np.float64)
    if len(y) < 3 or len(y) != len(x):
        raise ValueError(f"need >= 3 subjects with ages for a correlation truth map, got {len(y)} ages for {len(x)} images")
    xc = x - x.mean(0)
    yc = y - y.mean()
    den = np.sqrt((xc**2).sum(0) * (yc**2).sum())
    r = np.where(den > 0, (xc * yc[:, None]).sum(0) / np.where(den > 0, den, 1.0), 0.0)
    out = np.abs(r).reshape(images.shape[1:])
    return out * mask if mask is not None else out


def enrichment(attr: np.ndarray, truth: np.ndarray, mask: np.ndarray, top: float = TOP_FRACTION) -> float:
    """Share of (non-negative) map mass in the top-``top`` truth voxels inside ``mask``, over ``top``.

    1 = chance, ``1/top`` = all mass in the truth's top voxels. An all-zero map gives 0.

    Raises:
        ValueError: shapes differ or the mask is empty.
    """
    _check_same_shape(truth, attr, "truth map")
    _check_same_shape(mask, attr, "brain mask")
    a = np.clip(np.asarray(attr, dtype=np.float64)[mask], 0, None)
    t = np.asarray(truth, dtype=np.float64)[mask]
    if t.size == 0:
        raise ValueError("brain mask is empty")
    k = max(1, int(round(top * t.size)))
    top_idx = np.argpartition(-t, k - 1)[:k]
    total = a.sum()
    return float(a[top_idx].sum() / total / (k / t.size)) if total > 0 else 0.0


def spearman(attr: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Spearman's rho between map and truth inside ``mask`` (0 when either is constant)."""
    from scipy.stats import spearmanr

    _check_same_shape(truth, attr, "truth map")
    a, t = np.asarray(attr)[mask], np.asarray(truth)[mask]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(t) == 0:
        return 0.0
    return float(spearmanr(a, t).statistic)


def perturbation_curves(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    attr: np.ndarray,
    mask: np.ndarray,
    background: float,
    steps: int = 10,
    fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Deletion and insertion curves of one subject, and the random-order baseline.

    Args:
        predict: ``(B, 1, D, H, W) -> (B,)`` predicted age.
        image: (1, D, H, W) volume.
        attr: (D, H, W) map; its order (descending, ties broken by a fixed random order) is used.
        mask: (D, H, W) brain mask; only brain voxels are perturbed.
        background: value a deleted voxel takes (the shards' background).
        steps: curve points after the start.
        fraction: share of brain voxels deleted (or inserted) at the last step.
        seed: random order for the baseline and for ties.

    Returns:
        ``deletion``/``insertion``/``random_deletion`` (|pred - full pred| per step, years) and
        ``aopc_deletion`` (mean |change| when deleting the top voxels, higher = more faithful),
        ``aopc_insertion`` (mean decrease of the remaining gap when inserting, higher = more
        faithful), ``aopc_random`` (deletion with a random order: the chance level).
    """
    _check_same_shape(np.asarray(attr), mask, "attribution map")
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(mask.ravel())
    jitter = rng.random(idx.size) * 1e-9
    a = np.asarray(attr, dtype=np.float64).ravel()[idx]
    order = idx[np.lexsort((jitter, -a))]
    rand = idx[rng.permutation(idx.size)]
    n = [int(round(fraction * idx.size * s / steps)) for s in range(steps + 1)]
    flat = image.reshape(-1)
    bg_img = flat.clone()
    bg_img[torch.from_numpy(idx)] = background

    def series(base: Tensor, fill: Tensor, ordr: np.ndarray) -> Tensor:
        vols = []
        for k in n:
            v = base.clone()
            sel = torch.from_numpy(ordr[:k])
            v[sel] = fill[sel]
            vols.append(v.reshape(image.shape))
        with torch.no_grad():
            return torch.cat([predict(torch.stack(vols[i:i + 4])).float().reshape(-1) for i in range(0, len(vols), 4)])

    full = series(flat, flat, order[:0])[0]
    blank_val = series(bg_img, bg_img, order[:0])[0]
    dele = (series(flat, bg_img, order) - full).abs()
    rdel = (series(flat, bg_img, rand) - full).abs()
    ins = (series(bg_img, flat, order) - full).abs()
    gap0 = float((blank_val - full).abs())
    return {
        "deletion": dele.tolist(), "insertion": ins.tolist(), "random_deletion": rdel.tolist(),
        "aopc_deletion": float(dele[1:].mean()), "aopc_random": float(rdel[1:].mean()),
        "aopc_insertion": float((gap0 - ins[1:]).mean()), "blank_gap": gap0,
    }


def summarise_curves(curves: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean AOPCs over subjects."""
    keys = ("aopc_deletion", "aopc_insertion", "aopc_random")
    return {k: float(np.mean([c[k] for c in curves])) for k in keys} if curves else {}
