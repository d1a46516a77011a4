"""Digests that make a damaged checkpoint unreadable instead of silently wrong.

PyTorch's zip container does not check CRCs when it reads tensor records, so
flipped bytes inside a tensor load without complaint (issue 14, D1/S1). Two
kinds of checkpoint get two kinds of digest:

* a plain ``.pt`` dict carries ``integrity = {"sha256": ...}``: the SHA-256 of
  its own content (every tensor's dtype, shape and bytes, every key and scalar,
  in order), computed before writing and recomputed after ``torch.load``. It
  travels with the data, so hard links (``last.pt``, ``best.pt``) and copies
  stay verifiable;
* a DeepSpeed tag folder, whose files DeepSpeed writes itself, gets
  ``checksums.sha256`` (``sha256sum`` format, so ``sha256sum -c`` works too),
  written by rank 0 after every rank has finished its part.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointUnreadable",
    "DS_MANIFEST",
    "content_digest",
    "seal",
    "verify_sealed",
    "write_folder_manifest",
    "verify_folder_manifest",
]

DS_MANIFEST = "checksums.sha256"
_KEY = "integrity"
_CHUNK = 1 << 22


class CheckpointUnreadable(ValueError):
    """A checkpoint that cannot be used: truncated, not a checkpoint, or its digest does not match."""


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d;" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"%c%d;" % (ord("L") if isinstance(obj, list) else ord("U"), len(obj)))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d;" % len(data))
        h.update(data)
    elif isinstance(obj, bytes):
        h.update(b"B%d;" % len(obj))
        h.update(obj)
    elif isinstance(obj, float):
        h.update(b"F" + (repr(obj) if math.isfinite(obj) else str(obj)).encode() + b";")
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}{a.shape};".encode())
        h.update(a.view(np.uint8).reshape(-1))
    else:  # bool, int, None, dtypes: their repr is exact and stable
        h.update(b"R" + repr(obj).encode() + b";")


def content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint dict's content (order-sensitive, tensors by value)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """Return ``state`` with its content digest under ``integrity`` (replacing an old one)."""
    body = {k: v for k, v in state.items() if k != _KEY}
    return {**body, _KEY: {"sha256": content_digest(body), "scheme": "content-v1"}}


def verify_sealed(state: Any, path: str | Path) -> bool:
    """Check the digest of a loaded checkpoint dict and drop it from ``state``.

    Returns:
        True when verified, False for a checkpoint written before digests existed.

    Raises:
        CheckpointUnreadable: the content does not match its digest (flipped bits, a torn copy).
    """
    if not isinstance(state, dict):
        raise CheckpointUnreadable(f"{path}: not a checkpoint (a {type(state).__name__}, not a dict)")
    stamp = state.pop(_KEY, None)
    if stamp is None:
        return False
    expected = stamp.get("sha256") if isinstance(stamp, dict) else None
    if not isinstance(expected, str) or content_digest(state) != expected:
        raise CheckpointUnreadable(f"{path}: content does not match its SHA-256 digest (damaged on disk or in transfer)")
    return True


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_folder_manifest(folder: Path) -> Path:
    """Write ``folder/checksums.sha256`` for every file in ``folder`` (temp file + rename)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != DS_MANIFEST and not p.name.startswith("."))
    lines = [f"{_file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    tmp = folder / f".{DS_MANIFEST}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / DS_MANIFEST)
    return folder / DS_MANIFEST


def verify_folder_manifest(folder: Path) -> bool:
    """Check every file listed in ``folder/checksums.sha256``.

    Returns:
        True when verified, False when the folder has no manifest (written before digests existed).

    Raises:
        CheckpointUnreadable: a listed file is missing or its SHA-256 differs.
    """
    manifest = folder / DS_MANIFEST
    if not manifest.exists():
        return False
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        target = folder / name
        if not target.is_file():
            raise CheckpointUnreadable(f"{folder}: {name} is listed in {DS_MANIFEST} but missing")
        if _file_sha256(target) != digest:
            raise CheckpointUnreadable(f"{target}: SHA-256 differs from {DS_MANIFEST} (damaged on disk or in transfer)")
    return True
