"""Atomic, verified checkpoints: write, read, list, prune, set aside, export.

A checkpoint is written to a temp file, fsync'ed and ``os.replace``'d, so a
``kill -9`` at any moment leaves either the old or the new file, never half of
one; it carries a SHA-256 digest of its content (see ``integrity``) that every
read checks. ``last.pt`` and ``best.pt`` are hard links to a ``ckpt-step*.pt``
file. DeepSpeed runs keep DeepSpeed's own folders under ``ds/`` (one tag per
step, with ``checksums.sha256``) plus our trainer state.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_hpc.engine.integrity import (
    DS_MANIFEST,
    CheckpointUnreadable,
    seal,
    verify_folder_manifest,
    verify_sealed,
)

__all__ = [
    "CKPT_FORMAT",
    "CheckpointUnreadable",
    "atomic_torch_save",
    "save_sealed",
    "read_checkpoint",
    "verify_checkpoint",
    "remove_leftovers",
    "set_aside_newer",
    "capture_rng",
    "restore_rng",
    "checkpoint_path",
    "list_checkpoints",
    "find_resume",
    "step_of",
    "link_as",
    "prune_checkpoints",
    "git_sha",
    "export_state_dict",
    "load_inference_bundle",
]

log = logging.getLogger(__name__)
CKPT_FORMAT = 1
_STEP_RE = re.compile(r"^ckpt-step(\d+)\.pt$")
_DS_RE = re.compile(r"^step(\d+)$")
# Test hook: hold the write half-way for this many seconds (to kill -9 a writer).
_HOLD_ENV = "BRAINAGE_CKPT_WRITE_HOLD_S"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            hold = float(os.environ.get(_HOLD_ENV, "0") or 0)
            if hold > 0:
                half = len(data) // 2
                fh.write(data[:half])
                fh.flush()
                (path.parent / f"{path.name}.writing").touch()
                time.sleep(hold)
                fh.write(data[half:])
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:  # disk full, quota, I/O error: name the checkpoint, not the anonymous temp file
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        (path.parent / f"{path.name}.writing").unlink(missing_ok=True)
    return path


def save_sealed(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically with its content digest (see :func:`read_checkpoint`)."""
    return atomic_torch_save(seal(state), path)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:160]}" if text else exc.__class__.__name__


def read_checkpoint(path: str | Path, *, warn_unverified: bool = True) -> dict[str, Any]:
    """``torch.load`` (``weights_only``) a plain checkpoint file and verify its digest.

    Raises:
        CheckpointUnreadable: one line naming the file and the problem (empty, truncated,
            not a checkpoint, digest mismatch).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointUnreadable(f"{path}: cannot read it ({exc.strerror})") from None
    if path.is_dir():
        raise CheckpointUnreadable(f"{path}: is a folder, not a checkpoint file")
    if size == 0:
        raise CheckpointUnreadable(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError/... for damaged files
        raise CheckpointUnreadable(f"{path}: not a readable checkpoint ({_one_line(exc)})") from None
    if not verify_sealed(state, path) and warn_unverified:
        log.warning("%s: written before checkpoint digests existed; loaded without verification", path)
    return state


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointUnreadable` unless ``path`` (file or DeepSpeed tag folder) verifies."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".complete").exists():
            raise CheckpointUnreadable(f"{path}: incomplete DeepSpeed checkpoint (no .complete marker)")
        if not verify_folder_manifest(path):
            log.warning("%s: written before checkpoint digests existed (no %s); not verified", path, DS_MANIFEST)
        read_checkpoint(path / "trainer_state.pt", warn_unverified=False)
    else:
        read_checkpoint(path)


def _is_leftover(p: Path) -> bool:
    name = p.name
    return p.is_file() and (
        name.endswith(".writing") or (name.startswith(".") and (name.endswith(".tmp") or name.startswith(".config.yaml.")))
    )


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what writes killed half-way left behind (``.ckpt-step*.pt.*.tmp``, ``*.writing``, ...).

    Call only while holding the run folder lock: then no other process is writing them.
    """
    gone: list[Path] = []
    for folder in (run_dir, run_dir / "ds"):
        if folder.is_dir():
            for p in folder.iterdir():
                if _is_leftover(p):
                    p.unlink(missing_ok=True)
                    gone.append(p)
    if (run_dir / "ds").is_dir():
        for tag in (run_dir / "ds").iterdir():
            if _DS_RE.match(tag.name) and tag.is_dir() and not (tag / ".complete").exists():
                shutil.rmtree(tag, ignore_errors=True)  # a DeepSpeed save killed before it finished
                gone.append(tag)
    if gone:
        log.info("removed %d leftover(s) of interrupted writes: %s", len(gone), ", ".join(p.name for p in gone[:5]))
    return gone


def set_aside_newer(run_dir: Path, backend: str, step: int) -> Path | None:
    """Move every checkpoint newer than ``step`` to ``run_dir/superseded/<stamp>/`` (nothing is deleted).

    Called after resuming from ``step``: newer checkpoints belong to a future that
    this run abandons (they were unreadable, or the user resumed from an older one).
    Left in place, ``--resume auto`` or pruning would later pick them over the new ones.
    """
    newer = [p for s, p in list_checkpoints(run_dir, backend, include_incomplete=True) if s > step]
    if not newer:
        return None
    label = f"after-step{step:08d}" if step >= 0 else "before-restart"
    dest = run_dir / "superseded" / f"{label}-{time.strftime('%Y%m%dT%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in newer:
        os.replace(p, dest / p.name)
    for name in ("last.pt", "best.pt"):
        link = run_dir / name
        if link.exists() and any(link.samefile(dest / p.name) for p in newer if (dest / p.name).is_file()):
            os.replace(link, dest / name)
    for name in ("last.txt", "best.txt"):
        pointer = run_dir / "ds" / name
        if pointer.exists() and pointer.read_text().strip() in {p.name for p in newer}:
            os.replace(pointer, dest / name)
    log.warning("moved %d checkpoint(s) newer than the resume point (step %d) to %s", len(newer), step, dest)
    return dest


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_as(src: Path, name: str) -> Path:
    """Atomically point ``src.parent/name`` at ``src`` (hard link, copy if links fail)."""
    dst = src.parent / name
    tmp = src.parent / f".{name}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def checkpoint_path(run_dir: Path, step: int, backend: str) -> Path:
    """Where the checkpoint of ``step`` lives (a file, or a DeepSpeed tag folder)."""
    if backend == "deepspeed":
        return run_dir / "ds" / f"step{step:08d}"
    return run_dir / f"ckpt-step{step:08d}.pt"


def list_checkpoints(run_dir: Path, backend: str, include_incomplete: bool = False) -> list[tuple[int, Path]]:
    """All checkpoints of a run, newest first (DeepSpeed: only finished tags unless asked)."""
    out: list[tuple[int, Path]] = []
    if backend == "deepspeed":
        folder = run_dir / "ds"
        if folder.is_dir():
            for p in folder.iterdir():
                m = _DS_RE.match(p.name)
                if m and p.is_dir() and (include_incomplete or (p / ".complete").exists()):
                    out.append((int(m.group(1)), p))
    elif run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def find_resume(run_dir: Path, backend: str, resume: str) -> list[Path]:
    """Checkpoints to try, in order: ``auto`` = newest first; ``none``; or one PATH."""
    if resume == "none":
        return []
    if resume == "auto":
        return [p for _, p in list_checkpoints(run_dir, backend)]
    p = Path(resume)
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint not found (use --resume auto|none|PATH)")
    return [p]


def step_of(path: Path) -> int | None:
    """Step number in a checkpoint's name (``ckpt-step00000012.pt``, ``ds/step00000012``), else None."""
    m = _STEP_RE.match(path.name) or _DS_RE.match(path.name)
    return int(m.group(1)) if m else None


def prune_checkpoints(run_dir: Path, backend: str, keep: int, protect: set[Path]) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, never one in ``protect``; return what went."""
    keep_set = {q.resolve() for q in protect if q.exists()}
    gone: list[Path] = []
    for _, p in list_checkpoints(run_dir, backend)[max(keep, 1):]:
        if p.resolve() in keep_set:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_sha() -> str:
    """Commit of the code that ran (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_state_dict(run_dir: str | Path, out: str | Path | None = None, which: str = "best") -> Path:
    """Export a run's checkpoint (plain or DeepSpeed ZeRO) to one inference file.

    The file holds ``{"format": "brainage-model", "state_dict", "config",
    "shape", "preprocess", "affine", "step"}`` so ``evaluate``/``predict`` need
    nothing else from the run.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "model.pt"
    plain = run_dir / f"{which}.pt"
    if not plain.exists():
        plain = run_dir / "last.pt"
    if plain.exists():
        ckpt = read_checkpoint(plain)
        meta = ckpt
        state_dict = ckpt["model"]
    else:
        pointer = run_dir / "ds" / f"{which}.txt"
        if not pointer.exists():
            pointer = run_dir / "ds" / "last.txt"
        if not pointer.exists():
            raise FileNotFoundError(f"{run_dir}: no checkpoint (last.pt, best.pt or ds/last.txt) to export")
        tag = pointer.read_text().strip()
        verify_checkpoint(run_dir / "ds" / tag)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "ds"), tag=tag)
        meta = read_checkpoint(run_dir / "ds" / tag / "trainer_state.pt")
    bundle = {
        "format": "brainage-model",
        "state_dict": {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()},
        "config": meta["config"],
        "shape": meta.get("shape"),
        "preprocess": meta.get("preprocess"),
        "affine": meta.get("affine"),
        "step": meta.get("step"),
        "fingerprint": meta.get("fingerprint"),
    }
    save_sealed(bundle, out)
    return out


def load_inference_bundle(path: str | Path) -> dict[str, Any]:
    """Load an exported model file, or export a run folder on the fly."""
    path = Path(path)
    if path.is_dir():
        target = path / "model.pt"
        if not target.exists() or any(
            (path / n).exists() and (path / n).stat().st_mtime > target.stat().st_mtime for n in ("best.pt", "last.pt")
        ):
            target = export_state_dict(path, target)
        path = target
    bundle = read_checkpoint(path)  # CheckpointUnreadable is a ValueError: one line, file and problem
    if isinstance(bundle, dict) and bundle.get("format") != "brainage-model" and "model" in bundle:
        bundle = {
            "format": "brainage-model",
            "state_dict": bundle["model"],
            "config": bundle["config"],
            "shape": bundle.get("shape"),
            "preprocess": bundle.get("preprocess"),
            "affine": bundle.get("affine"),
            "step": bundle.get("step"),
            "fingerprint": bundle.get("fingerprint"),
        }
    if not isinstance(bundle, dict) or "state_dict" not in bundle:
        raise ValueError(f"{path}: not a brainage checkpoint (no state_dict)")
    return bundle
