"""Run configuration as frozen dataclasses, loaded from YAML and CLI overrides.

Configuration is data: every hyper-parameter lives here, so changing the epoch
count is a YAML edit or ``train.epochs=5`` on the command line, never code.
Unknown keys are rejected with the valid options, because a misspelt key that is
silently ignored costs a week of GPU time.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from brainage_hpc.config_rules import ConfigError, check_params, check_ranges

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "LaunchConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "check_params",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
    "BUILTIN_CONFIG_DIR",
]

BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"

Task = Literal["regress", "classify4", "classify2"]
Precision = Literal["32", "bf16-mixed", "16-mixed"]
Backend = Literal["single", "ddp", "deepspeed"]


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation applied at load time (never stored in shards)."""

    enabled: bool = True
    device: Literal["cpu", "gpu"] = "cpu"
    flip_prob: float = 0.5
    flip_axes: list[int] = field(default_factory=lambda: [0])  # axes of (D, H, W); 0 is left-right in RAS
    affine_prob: float = 0.3
    rotate_deg: float = 5.0
    scale: float = 0.05
    translate_vox: float = 2.0
    elastic_prob: float = 0.0
    intensity_shift: float = 0.1
    intensity_scale: float = 0.1
    noise_std: float = 0.05
    intensity_prob: float = 0.5  # probability of the intensity scale/shift per volume
    noise_prob: float = 0.5  # probability of Gaussian noise per volume


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how batches are assembled.

    ``batch_size`` is global: each rank gets ``batch_size // world_size`` so the
    optimisation does not change with the number of GPUs.
    """

    shards: str = ""
    shape: list[int] = field(default_factory=lambda: [128, 128, 128])
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 8
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    start_method: Literal["fork", "spawn", "forkserver"] = "fork"
    balanced: bool = False
    cache: Literal["none", "memory", "gpu"] = "none"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Which network and its constructor keyword arguments (``params``)."""

    name: str = "cnn3d"
    task: Task = "regress"
    params: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, backend and checkpoint cadence."""

    backend: Backend = "single"
    precision: Precision = "32"
    epochs: int = 10
    max_steps: int = 0  # 0: epochs decide
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = 0
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0: off
    seed: int = 0
    deterministic: bool = False
    val_every_epochs: int = 1
    ckpt_every_steps: int = 0  # 0: only at epoch end
    keep_last: int = 3
    early_stop_patience: int = 0  # 0: off
    monitor: str = "val/loss"
    monitor_mode: Literal["min", "max"] = "min"
    nan_max: int = 10
    log_every_steps: int = 10
    image_log_every_epochs: int = 1
    zero_stage: int = 2
    offload_optimizer: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the generated config
    progress: bool = True
    dist_timeout_s: int = 600  # process-group timeout: a dead rank frees the allocation after this long


@dataclass(frozen=True)
class LaunchConfig:
    """SLURM resources for ``python -m brainage_hpc.launch``."""

    executor: Literal["slurm", "local"] = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one per GPU, or one per node on CPU
    cpus_per_task: int = 2
    mem_gb: float = 0  # memory per node in GB (--mem 64G, 500M -> 0.488); 0: leave to the cluster default
    partition: str = ""
    account: str = ""
    qos: str = ""  # --qos
    constraint: str = ""  # --constraint, node features (e.g. "a100&ib")
    exclude: str = ""  # --exclude, nodes to avoid (e.g. "gpu[03-04]")
    mail_type: str = ""  # --mail-type (e.g. END,FAIL)
    mail_user: str = ""  # --mail-user
    time_min: int = 60
    signal_delay_s: int = 120  # USR1 this long before the time limit: checkpoint + requeue
    max_requeues: int = 20
    max_stalled_requeues: int = 3  # stop requeueing after this many restarts in a row without a new checkpoint
    array_parallelism: int = 0  # sweeps: array tasks running at once (%N); 0: all
    slurm_additional: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; written into the run folder and every checkpoint."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# --------------------------------------------------------------------------- building


def _check_scalar(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        options = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in options:
            value = str(value)  # precision: 32 in YAML is the string "32"
        if value not in options:
            hint = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
            did = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"{source}: {key}={value!r} is not valid.{did} Valid: {', '.join(map(str, options))}"
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{source}: {key}={value!r} must be a finite number")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key}={value!r} must be a string")
        return str(value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}={value!r} must be a list")
        return [_check_scalar(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}={value!r} must be a mapping")
        return dict(value)
    return value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            did = f" Did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"{source}: unknown key '{full}'.{did} Valid keys: {', '.join(prefix + n for n in names)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.", source)
        else:
            kwargs[key] = _check_scalar(value, tp, full, source)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("params", "deepspeed"):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a","b","c"], value); the value is YAML-typed.

    Example:
        >>> parse_override("train.lr=3e-4")
        (['train', 'lr'], 0.0003)
        >>> parse_override("data.shape=[64,64,64]")
        (['data', 'shape'], [64, 64, 64])
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' is malformed: expected key.sub=value (e.g. train.lr=1e-3)")
    key, _, raw_value = text.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not p or not p.replace("_", "").isalnum() for p in parts):
        raise ConfigError(f"override '{text}' is malformed: bad key '{key}' (expected key.sub=value)")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}' is malformed: value is not valid YAML ({exc.__class__.__name__})") from None
    if isinstance(value, str) and value.strip() != value:
        value = value.strip()
    # YAML reads 1e-3 as a string (no dot); accept it as a float.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and value.lower() not in ("nan", "inf") else value
        except ValueError:
            pass
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.sub=value`` override set."""
    out = json.loads(json.dumps(raw))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base:
        base_path = resolve_config_path(str(base), relative_to=path.parent)
        raw = _deep_merge(_read_yaml(base_path), raw)
    return raw


def resolve_config_path(name: str, relative_to: Path | None = None) -> Path:
    """Find a config by path, or by name among the built-in configs (``cnn_demo``)."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    stem = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    candidates.append(BUILTIN_CONFIG_DIR / Path(stem).name)
    for c in candidates:
        if c.is_file():
            return c
    builtin = sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"{name}: config file not found (built-in: {', '.join(builtin)})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (a path or a built-in name) and apply ``key.sub=value`` overrides."""
    if path is None:
        raw: dict[str, Any] = {}
        source = "<defaults>"
    else:
        p = resolve_config_path(str(path))
        raw = _read_yaml(p)
        source = str(p)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} (with overrides)"
    cfg = _build(RunConfig, raw, "", source)
    check_ranges(cfg, source)
    return cfg


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Rebuild a RunConfig from ``config_to_dict`` output (e.g. inside a checkpoint)."""
    cfg = _build(RunConfig, raw, "", source)
    check_ranges(cfg, source)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form, suitable for YAML, JSON and checkpoints."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
