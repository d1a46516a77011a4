"""Per-layer summary of a model: output shapes, parameters and forward FLOPs per volume.

FLOPs are counted with forward hooks as 2 × multiply-accumulates of the
convolution, transposed-convolution and linear layers (normalisation, activations
and pooling are ignored: they are a few percent). The forward pass runs on the
``meta`` device when the model's parameters are there, so full-size models are
summarised instantly without allocating memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LayerInfo", "ModelSummary", "layer_macs", "summarize"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerInfo:
    """One executed layer.

    Attributes:
        name: qualified module name (``features.0.conv1``).
        kind: class name (``Conv3d``).
        out_shape: output shape without the batch axis, e.g. (C, D, H, W); () if not a tensor.
        params: parameters owned directly by this module.
        macs: multiply-accumulates per volume (0 for layers that are not counted).
    """

    name: str
    kind: str
    out_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass(frozen=True)
class ModelSummary:
    """Summary of one forward pass over a single volume.

    Attributes:
        model: model class name.
        in_shape: input spatial shape (D, H, W).
        layers: executed layers, in call order.
        total_params: all parameters.
        trainable_params: parameters with ``requires_grad``.
        macs: multiply-accumulates per volume (forward).
    """

    model: str
    in_shape: tuple[int, int, int]
    layers: list[LayerInfo]
    total_params: int
    trainable_params: int
    macs: int

    @property
    def gflops(self) -> float:
        """Forward GFLOPs per volume (2 × MACs / 1e9)."""
        return 2.0 * self.macs / 1e9

    def format(self) -> str:
        """A fixed-width table plus totals, for printing."""
        rows = [("layer", "type", "output shape", "params", "GFLOPs")]
        for layer in self.layers:
            shape = "(" + ", ".join(map(str, layer.out_shape)) + ")"
            gflops = f"{2.0 * layer.macs / 1e9:.3f}" if layer.macs else "-"
            rows.append((layer.name, layer.kind, shape, f"{layer.params:,}", gflops))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"{self.model}, input (1, {', '.join(map(str, self.in_shape))})"]
        for i, r in enumerate(rows):
            lines.append(
                "  ".join(
                    c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(f"Total params: {self.total_params:,} (trainable {self.trainable_params:,})")
        lines.append(
            f"Forward: {self.gflops:.2f} GFLOPs per volume (2 x MACs of conv/linear layers; a training step is ~3x)"
        )
        return "\n".join(lines)


def layer_macs(module: nn.Module, inputs: tuple[object, ...], output: object) -> int:
    """Multiply-accumulates per sample of one conv/linear call (0 for other layers).

    Example:
        >>> conv = nn.Conv3d(1, 4, 3)
        >>> y = conv(torch.zeros(1, 1, 8, 8, 8))
        >>> layer_macs(conv, (torch.zeros(1, 1, 8, 8, 8),), y) == 4 * 6**3 * 27
        True
    """
    if not isinstance(output, Tensor) or output.dim() == 0:
        return 0
    batch = output.shape[0] if output.dim() > 1 else 1
    if isinstance(module, _CONV):
        per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() // batch * per_out
    if isinstance(module, _CONV_T):
        x = inputs[0]
        if not isinstance(x, Tensor):
            return 0
        per_in = (module.out_channels // module.groups) * math.prod(module.kernel_size)
        return x.numel() // batch * per_in
    if isinstance(module, nn.Linear):
        return output.numel() // batch * module.in_features
    return 0


def summarize(model: nn.Module, in_shape: Sequence[int], batch: dict[str, Tensor] | None = None) -> ModelSummary:
    """Run one volume through ``model`` (eval mode, no grad) and record every leaf layer.

    Args:
        model: a brainage model (``forward(batch) -> dict``); may live on the ``meta`` device.
        in_shape: input spatial shape (D, H, W).
        batch: optional input batch of size 1; default zeros ``image`` (1, 1, D, H, W) and ``sex`` (1,)
            on the model's device.

    Returns:
        ModelSummary with per-layer output shapes, parameters and MACs per volume.

    Example:
        >>> from brainage_hpc.models.cnn3d import CNN3d
        >>> s = summarize(CNN3d(in_shape=(32, 32, 32), depth=2), (32, 32, 32))
        >>> s.layers[0].name, s.layers[0].out_shape
        ('features.0.conv1', (4, 30, 30, 30))
    """
    shape = tuple(int(s) for s in in_shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if batch is None:
        batch = {"image": torch.zeros((1, 1, *shape), device=device, dtype=dtype), "sex": torch.zeros(1, device=device)}

    layers: list[LayerInfo] = []
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            out_shape = tuple(output.shape[1:]) if isinstance(output, Tensor) and output.dim() > 0 else ()
            own = sum(p.numel() for p in module.parameters(recurse=False))
            layers.append(LayerInfo(name, type(module).__name__, out_shape, own, layer_macs(module, inputs, output)))

        return hook

    for name, module in model.named_modules():
        is_leaf = next(module.children(), None) is None
        if name and (is_leaf or any(True for _ in module.parameters(recurse=False))):
            handles.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(
        model=type(model).__name__,
        in_shape=shape,  # type: ignore[arg-type]
        layers=layers,
        total_params=total,
        trainable_params=trainable,
        macs=sum(layer.macs for layer in layers),
    )
