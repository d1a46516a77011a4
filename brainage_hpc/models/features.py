"""Penultimate-layer features of any zoo model, without changing its outputs or checkpoints.

Each model class names the module whose output is its penultimate representation in a
class attribute ``penultimate`` (``CNN3d``: ``head_act``, the head activation before the
final linear layer; ``SFCN``: ``pool``, the global average pool before the classifier;
``ConditionalVAE3d``: ``z_mean``, the encoder's posterior mean). A forward hook on that
module reads it during the ordinary forward pass, so predictions are bit-for-bit those
of ``model(batch)``. The features feed the out-of-distribution score
(:mod:`brainage_hpc.evaluation.calibration`).

An exported model (ONNX/TorchScript) has no modules to hook: its graph returns the
features as an extra output named ``features`` (see :mod:`brainage_hpc.evaluation.exported`),
which :func:`forward_with_features` passes through.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["FEATURES_KEY", "forward_with_features", "penultimate_module"]

FEATURES_KEY = "features"


def _unwrap(model: nn.Module) -> nn.Module:
    for attr in ("_orig_mod", "module"):  # torch.compile / DDP wrappers
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def penultimate_module(model: nn.Module) -> nn.Module | None:
    """The module whose output is ``model``'s penultimate features, or None when the class names none."""
    inner = _unwrap(model)
    name = getattr(type(inner), "penultimate", None)
    if not isinstance(name, str):
        return None
    return dict(inner.named_modules()).get(name)


def forward_with_features(model: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor | None]:
    """``model(batch)`` plus its penultimate features (B, F) float32, or None when the model has none.

    Example:
        >>> import torch
        >>> from brainage_hpc.models import CNN3d
        >>> m = CNN3d((32, 32, 32), depth=2, width=4).eval()
        >>> out, f = forward_with_features(m, {"image": torch.zeros(2, 1, 32, 32, 32), "sex": torch.zeros(2)})
        >>> f.shape[0], f.ndim
        (2, 2)
    """
    module = penultimate_module(model)
    if module is None:
        out = model(batch)
        feats = out.get(FEATURES_KEY) if isinstance(out, dict) else None
        return out, None if feats is None else feats.float().flatten(1)
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _inp, output: seen.append(output))
    try:
        out = model(batch)
    finally:
        handle.remove()
    if not seen:
        return out, None
    return out, seen[-1].detach().float().flatten(1)
