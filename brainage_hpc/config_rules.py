"""Value checks of the run configuration: ranges per key and typed model parameters.

Types are checked while the config is built (``config._check_scalar``); this
module checks what a type cannot say: ``data.batch_size=0`` is an integer but
divides by zero later, ``train.lr=-1`` is a float but trains backwards,
``train.epochs=0`` "completes" at step 0 (issue 14, T2, S7). Every numeric key
of the config has a rule here (a unit test enforces it), and ``model.params``
are checked against the model constructor's annotations (U2), so every
nonsense value ends in one line that names the key, the value and what is valid.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from typing import Any, Literal

__all__ = ["ConfigError", "RULES", "check_params", "check_ranges"]


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key and the source."""


# dotted key -> (low, high, low inclusive, high inclusive); None: unbounded on that side
RULES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.shape": (1, None, True, True),
    "data.batch_size": (1, None, True, True),
    "data.num_workers": (0, None, True, True),
    "data.prefetch_factor": (1, None, True, True),
    "data.augment.flip_prob": (0, 1, True, True),
    "data.augment.flip_axes": (0, 2, True, True),
    "data.augment.affine_prob": (0, 1, True, True),
    "data.augment.rotate_deg": (0, 180, True, True),
    "data.augment.scale": (0, 1, True, False),
    "data.augment.translate_vox": (0, None, True, True),
    "data.augment.elastic_prob": (0, 1, True, True),
    "data.augment.intensity_shift": (0, None, True, True),
    "data.augment.intensity_scale": (0, 1, True, False),
    "data.augment.noise_std": (0, None, True, True),
    "data.augment.intensity_prob": (0, 1, True, True),
    "data.augment.noise_prob": (0, 1, True, True),
    "train.epochs": (1, None, True, True),
    "train.max_steps": (0, None, True, True),
    "train.lr": (0, None, False, True),
    "train.weight_decay": (0, None, True, True),
    "train.warmup_steps": (0, None, True, True),
    "train.grad_accum": (1, None, True, True),
    "train.grad_clip": (0, None, True, True),
    "train.seed": (0, 2**31 - 1, True, True),
    "train.val_every_epochs": (1, None, True, True),
    "train.ckpt_every_steps": (0, None, True, True),
    "train.keep_last": (1, None, True, True),
    "train.early_stop_patience": (0, None, True, True),
    "train.nan_max": (0, None, True, True),
    "train.log_every_steps": (1, None, True, True),
    "train.image_log_every_epochs": (0, None, True, True),
    "train.zero_stage": (0, 3, True, True),
    "train.dist_timeout_s": (10, 86400, True, True),
    "launch.nodes": (1, None, True, True),
    "launch.gpus_per_node": (0, None, True, True),
    "launch.tasks_per_node": (0, None, True, True),
    "launch.cpus_per_task": (1, None, True, True),
    "launch.mem_gb": (0, None, True, True),
    "launch.time_min": (1, None, True, True),
    "launch.signal_delay_s": (0, None, True, True),
    "launch.max_requeues": (0, None, True, True),
    "launch.max_stalled_requeues": (0, None, True, True),
    "launch.array_parallelism": (0, None, True, True),
}


def _describe(low: float | None, high: float | None, lo_in: bool, hi_in: bool) -> str:
    if low is not None and high is not None:
        return f"in {'[' if lo_in else '('}{low:g}, {high:g}{']' if hi_in else ')'}"
    if low is not None:
        return f"{'>=' if lo_in else '>'} {low:g}"
    return f"{'<=' if hi_in else '<'} {high:g}"


def _outside(v: float, low: float | None, high: float | None, lo_in: bool, hi_in: bool) -> bool:
    if low is not None and (v < low or (v == low and not lo_in)):
        return True
    return high is not None and (v > high or (v == high and not hi_in))


def check_ranges(cfg: Any, source: str) -> None:
    """Check every key of :data:`RULES` on a built ``RunConfig``.

    Raises:
        ConfigError: one line listing every value out of range, with what is valid.
    """
    problems = []
    for key, (low, high, lo_in, hi_in) in RULES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        values = node if isinstance(node, (list, tuple)) else [node]
        bad = [v for v in values if not math.isfinite(float(v)) or _outside(float(v), low, high, lo_in, hi_in)]
        if bad:
            problems.append(f"{key}={node!r} must be {_describe(low, high, lo_in, hi_in)}" + (" (each)" if node is not values[0] else ""))
    if len(list(cfg.data.shape)) != 3:
        problems.append(f"data.shape={list(cfg.data.shape)!r} must have 3 entries (D, H, W)")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


# --------------------------------------------------------------------------- model parameters


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        inner = args[0] if args and args[-1] is not Ellipsis or len(args) == 2 else Any
        return all(_matches(v, inner) for v in value)
    return True  # a type we do not model: leave it to the constructor


def check_params(params: dict[str, Any], fn: Any, prefix: str) -> None:
    """Check ``params`` against the annotations of ``fn`` (e.g. a model's ``__init__``).

    Raises:
        ConfigError: ``prefix.key=value must be <type>``, one line.
    """
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: nothing to check against
        return
    for key, value in params.items():
        tp = hints.get(key)
        if tp is not None and not _matches(value, tp):
            raise ConfigError(f"{prefix}.{key}={value!r} must be {_type_name(tp)}")
        numbers = value if isinstance(value, (list, tuple)) else [value]
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            # model constructors take counts (channels, depth, latent size: >= 1) and
            # non-negative reals (ages, weights, widths); dropout is a probability < 1
            if isinstance(v, int) and v < 1:
                raise ConfigError(f"{prefix}.{key}={value!r} must be >= 1 (a count)")
            if isinstance(v, float) and (v < 0 or ("dropout" in key and v >= 1)):
                valid = "in [0, 1)" if "dropout" in key else ">= 0"
                raise ConfigError(f"{prefix}.{key}={value!r} must be {valid}")
