"""Model names in configs -> constructors, with "did you mean" errors.

Every model is built as ``Model(in_shape=..., task=..., num_classes=..., **cfg.params)``;
the config task (``regress``/``classify4``/``classify2``) is mapped here, once.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from brainage_hpc.config import ConfigError, check_params
from brainage_hpc.models._common import Task, count_params
from brainage_hpc.models.cnn3d import CNN3d
from brainage_hpc.models.cvae import ConditionalVAE3d
from brainage_hpc.models.sfcn import SFCN

__all__ = ["MODEL_NAMES", "TASKS", "build_model", "get_model_class", "model_params", "param_count", "resolve_task"]

_MODELS: dict[str, type[nn.Module]] = {"cnn3d": CNN3d, "sfcn": SFCN, "cvae": ConditionalVAE3d}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)

# config task -> (model task, number of classes)
TASKS: dict[str, tuple[Task, int]] = {
    "regress": ("regress", 1),
    "classify4": ("classify", 4),
    "classify2": ("classify", 2),
}

_RESERVED = ("in_shape", "task", "num_classes")


class ModelConfigLike(Protocol):
    """The attributes of ``brainage_hpc.config.ModelConfig`` that the registry reads."""

    @property
    def name(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def params(self) -> dict[str, Any]: ...
    @property
    def channels_last(self) -> bool: ...
    @property
    def compile(self) -> bool: ...


def _did_you_mean(value: str, options: Sequence[str]) -> str:
    hint = difflib.get_close_matches(value, list(options), n=1)
    return f" Did you mean '{hint[0]}'?" if hint else ""


def get_model_class(name: str) -> type[nn.Module]:
    """Return the model class registered under ``name``.

    Raises:
        ConfigError: (a ``ValueError``) unknown name, with a suggestion and the valid names.

    Example:
        >>> get_model_class("sfcn").__name__
        'SFCN'
    """
    if name not in _MODELS:
        raise ConfigError(f"Unknown model '{name}'.{_did_you_mean(name, MODEL_NAMES)} Valid: {', '.join(MODEL_NAMES)}.")
    return _MODELS[name]


def resolve_task(task: str) -> tuple[Task, int]:
    """Map a config task to ``(model task, num_classes)``.

    Example:
        >>> resolve_task("classify4")
        ('classify', 4)
    """
    if task not in TASKS:
        raise ConfigError(f"Unknown task '{task}'.{_did_you_mean(task, list(TASKS))} Valid: {', '.join(TASKS)}.")
    return TASKS[task]


def model_params(name: str) -> dict[str, Any]:
    """The model's own constructor parameters (beyond in_shape/task/num_classes) and their defaults.

    Example:
        >>> model_params("cnn3d")["depth"]
        4
    """
    sig = inspect.signature(get_model_class(name).__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name not in ("self", *_RESERVED) and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def build_model(cfg: ModelConfigLike, in_shape: Sequence[int]) -> nn.Module:
    """Build the model a config names, for volumes of shape ``in_shape`` (D, H, W).

    Applies ``channels_last`` (``torch.channels_last_3d`` weights) and ``compile``
    (``torch.compile``; the result is an ``OptimizedModule`` whose ``state_dict`` keys carry
    an ``_orig_mod.`` prefix; unwrap with ``._orig_mod`` before saving).

    Args:
        cfg: a ``ModelConfig`` (name, task, params, channels_last, compile).
        in_shape: input spatial shape (D, H, W), e.g. ``RunConfig.data.shape``.

    Returns:
        The model (an ``nn.Module``; pure, on CPU, in training mode).

    Raises:
        ConfigError: (a ``ValueError``) unknown model name, task or parameter (with the valid options),
            or parameters the model rejects (e.g. a geometry that collapses the feature map).

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(name="cnn3d", task="classify2", params={"depth": 3},
        ...                       channels_last=False, compile=False)
        >>> build_model(cfg, [64, 64, 64]).num_classes
        2
    """
    cls = get_model_class(cfg.name)
    task, num_classes = resolve_task(cfg.task)
    params = dict(cfg.params or {})
    valid = model_params(cfg.name)
    for key in params:
        if key in _RESERVED:
            where = "model.task" if key != "in_shape" else "data.shape"
            raise ConfigError(f"model.params.{key} is set by the config ({where}); remove it from model.params.")
        if key not in valid:
            listing = ", ".join(f"{k}={v!r}" for k, v in valid.items())
            raise ConfigError(
                f"Unknown parameter '{key}' for model '{cfg.name}'.{_did_you_mean(key, list(valid))} "
                f"Valid params: {listing}."
            )
    check_params(params, cls.__init__, "model.params")  # types and ranges from the constructor's annotations
    try:
        model = cls(in_shape=tuple(int(s) for s in in_shape), task=task, num_classes=num_classes, **params)
    except (ValueError, TypeError) as exc:  # bad geometry or a param of the wrong type: a config problem
        raise ConfigError(f"model '{cfg.name}' (model.params={params}, data.shape={list(in_shape)}): {exc}") from exc
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only trainable ones).

    Example:
        >>> param_count(nn.Linear(3, 2))
        8
    """
    return count_params(model, trainable_only)
