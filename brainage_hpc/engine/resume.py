"""Whether a checkpoint may be continued with this run's config, and the record of a divergence.

A resume whose model, data or optimisation differs from the checkpoint's would
train a hybrid that no config describes (issue 14, D2, S6, shared launcher
folders). Every config key falls in one of three classes:

* **safe** (run length, logging, workers, checkpoint cadence, resources): may
  change on any resume; a new ``train.epochs``/``max_steps`` replans the
  learning-rate schedule (see ``schedule.LRPlan``);
* **tunable** (``train.lr``, ``weight_decay``, ``grad_clip``, ``warmup_steps``,
  ``schedule``, ``data.augment``): may change only on an explicit
  ``--resume PATH`` (a person decided, e.g. after a divergence), never on the
  unattended ``--resume auto`` of a requeued job;
* **locked** (everything else: model, data identity, batch, precision, backend,
  seed, optimizer...): never.

The data are compared by what they are, not where they are: the shards' shape,
preprocessing hash, fingerprint and split membership, so shards copied to node-local
scratch resume fine, and re-preprocessed shards with another config do not.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from brainage_hpc.config import ConfigError, config_from_dict, config_to_dict

__all__ = [
    "DIVERGED_NAME",
    "ResumeError",
    "archive_diverged",
    "check_compatible",
    "config_changes",
    "key_class",
    "read_diverged",
    "write_diverged",
]

DIVERGED_NAME = "diverged.json"
SAFE_KEYS = (
    "name", "launch", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
    "data.start_method", "data.cache", "data.shards", "data.shape", "train.epochs", "train.max_steps",
    "train.log_every_steps", "train.image_log_every_epochs", "train.progress", "train.ckpt_every_steps",
    "train.keep_last", "train.val_every_epochs", "train.early_stop_patience", "train.nan_max",
    "train.dist_timeout_s", "train.deterministic",
)
TUNABLE_KEYS = ("train.lr", "train.weight_decay", "train.grad_clip", "train.warmup_steps", "train.schedule", "data.augment")


class ResumeError(ConfigError):
    """A resume that is refused (incompatible config, unreadable explicit checkpoint, a diverged run)."""


def key_class(key: str) -> str:
    """``safe``, ``tunable`` or ``locked`` for a dotted config key."""
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    if under(SAFE_KEYS):
        return "safe"
    if under(TUNABLE_KEYS):
        return "tunable"
    return "locked"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    try:  # fill defaults of keys added since the checkpoint was written
        return config_to_dict(config_from_dict(raw, source="checkpoint"))
    except ConfigError:
        return raw


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs."""
    a, b = _flatten(_normalise(old)), _flatten(_normalise(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_compatible(
    stored: dict[str, Any], config: dict[str, Any], data_identity: dict[str, Any] | None,
    source: Path, run_dir: Path, explicit: bool,
) -> list[str]:
    """Refuse a resume from ``source`` whose config or data differ in a way that is not allowed.

    Returns:
        One ``key old -> new`` line per allowed change (for the log).

    Raises:
        ResumeError: one line naming the differing keys and the ways out.
    """
    changes = config_changes(stored.get("config") or {}, config) if stored.get("config") else []
    old_data, new_data = stored.get("data_identity"), data_identity
    if isinstance(old_data, dict) and isinstance(new_data, dict):
        for k in sorted(set(old_data) | set(new_data)):
            if k in old_data and k in new_data and old_data[k] != new_data[k]:
                changes.append((f"shards.{k}", old_data[k], new_data[k]))
    locked = [c for c in changes if c[0].startswith("shards.") or key_class(c[0]) == "locked"]
    tunable = [c for c in changes if c not in locked and key_class(c[0]) == "tunable"]
    listing = lambda cs: "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in cs)  # noqa: E731
    ways_out = (
        f"use a new --run-dir for the new config, --resume none to start over in {run_dir} "
        f"(its checkpoints are moved to {run_dir}/superseded/), or restore the old values ({run_dir}/config.yaml)"
    )
    if locked:
        raise ResumeError(f"cannot resume {source}: it was trained with a different config ({listing(locked)}); {ways_out}")
    if tunable and not explicit:
        raise ResumeError(
            f"cannot resume {source} automatically with changed optimisation settings ({listing(tunable)}); to continue "
            f"with the new values on purpose pass --resume {source}, else {ways_out}"
        )
    return [f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in changes]


# --------------------------------------------------------------------------- divergence record


def write_diverged(run_dir: Path, info: dict[str, Any]) -> Path:
    """Write ``run_dir/diverged.json`` (temp file + rename)."""
    path = run_dir / DIVERGED_NAME
    tmp = run_dir / f".{DIVERGED_NAME}.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_diverged(run_dir: Path) -> dict[str, Any] | None:
    """The divergence record of the run, if its last training diverged."""
    path = run_dir / DIVERGED_NAME
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = {}
    return info if isinstance(info, dict) else {}


def archive_diverged(run_dir: Path) -> None:
    """Keep the record under another name once a person has resumed past it."""
    path = run_dir / DIVERGED_NAME
    if path.exists():
        os.replace(path, run_dir / f"diverged-{time.strftime('%Y%m%dT%H%M%S')}.json")
