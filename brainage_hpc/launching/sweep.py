"""Sweep grids: ``--sweep train.lr=1e-3,3e-4 --sweep train.seed=0,1`` or a YAML file.

A sweep is the Cartesian product of its axes, submitted as one SLURM job array
(one task per point, each a full run with its own folder). Folder names come from
the overrides (``lr=1e-3,seed=0``) so a resubmitted sweep finds its runs again
and every point resumes from its own checkpoints.

YAML sweep file (``--sweep-file grid.yaml``), one list per key::

    train.lr: [1.0e-3, 3.0e-4]
    train.seed: [0, 1]
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from brainage_hpc.config import ConfigError, parse_override

__all__ = ["SWEEP_FILE", "SweepPoint", "expand_grid", "load_sweep_file", "parse_sweep_arg", "read_sweep", "write_sweep"]

SWEEP_FILE = "sweep.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: its folder name and the ``key=value`` overrides that define it."""

    index: int
    name: str
    overrides: tuple[str, ...]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets/braces/quotes: ``[32,32],[64,64]`` -> two values."""
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_sweep_arg(text: str) -> tuple[str, list[str]]:
    """``train.lr=1e-3,3e-4`` -> (``train.lr``, [``1e-3``, ``3e-4``]); values stay as typed."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not values.strip():
        raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2,... (e.g. train.lr=1e-3,3e-4)")
    items = _split_top_level(values)
    if any(not v for v in items):
        raise ConfigError(f"--sweep {text!r}: empty value in the list")
    for v in items:
        parse_override(f"{key}={v}")  # malformed key or YAML: one line now, not in 9 array tasks
    if len(set(items)) != len(items):
        raise ConfigError(f"--sweep {text!r}: a value is listed twice")
    return key, items


def load_sweep_file(path: str | Path) -> list[tuple[str, list[str]]]:
    """Axes from a YAML mapping ``key: [values]`` (a scalar is a one-value axis)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read sweep file ({exc.strerror})") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: sweep file is not valid YAML") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: a sweep file maps keys to value lists, e.g. 'train.lr: [1.0e-3, 3.0e-4]'")
    axes = []
    for key, values in raw.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"{path}: '{key}' has no values")
        texts = [json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v) for v in values]
        axes.append(parse_sweep_arg(f"{key}={','.join(texts)}"))
    return axes


def _label(key: str, all_keys: list[str]) -> str:
    short = key.rsplit(".", 1)[-1]
    return short if sum(k.rsplit(".", 1)[-1] == short for k in all_keys) == 1 else key


def expand_grid(axes: list[tuple[str, list[str]]]) -> list[SweepPoint]:
    """The Cartesian product of the axes, in the order given (last axis fastest).

    Example:
        >>> [p.name for p in expand_grid([("train.lr", ["1e-3", "3e-4"]), ("train.seed", ["0", "1"])])]
        ['lr=1e-3,seed=0', 'lr=1e-3,seed=1', 'lr=3e-4,seed=0', 'lr=3e-4,seed=1']
    """
    keys = [k for k, _ in axes]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ConfigError(f"--sweep: {', '.join(sorted(dup))} given twice; list all its values in one --sweep")
    points: list[SweepPoint] = []
    names: dict[str, int] = {}
    for index, combo in enumerate(itertools.product(*(values for _, values in axes))):
        overrides = tuple(f"{k}={v}" for k, v in zip(keys, combo))
        name = ",".join(f"{_label(k, keys)}={_UNSAFE.sub('_', v).strip('_') or '_'}" for k, v in zip(keys, combo))
        if name in names:
            raise ConfigError(f"--sweep: points {names[name]} and {index} would share the folder '{name}'")
        names[name] = index
        points.append(SweepPoint(index, name, overrides))
    return points


def write_sweep(sweep_dir: Path, points: list[SweepPoint], base_overrides: list[str], config: str, job_id: str) -> Path:
    """Record the grid in ``sweep.json`` (what ``brainage sweep-summary`` reads back)."""
    data: dict[str, Any] = {
        "config": config,
        "base_overrides": list(base_overrides),
        "job_id": job_id,
        "points": [{"index": p.index, "name": p.name, "overrides": list(p.overrides)} for p in points],
    }
    path = sweep_dir / SWEEP_FILE
    tmp = sweep_dir / f".{SWEEP_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_sweep(sweep_dir: Path) -> list[SweepPoint]:
    """The points of ``sweep.json`` ([] when the folder holds no sweep record or a damaged one)."""
    try:
        data = json.loads((sweep_dir / SWEEP_FILE).read_text())
        return [SweepPoint(int(p["index"]), str(p["name"]), tuple(p["overrides"])) for p in data["points"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
