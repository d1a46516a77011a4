"""HDF5 shards of preprocessed volumes: writing, the manifest, lazy reading, verification.

Layout of an output folder::

    shard-00000.h5      image (N, 1, D, H, W) float16, one volume per chunk;
                        subject_id (utf-8 str), age float32 (NaN: only the bin is known),
                        age_bin int8, sex int8 (0 F, 1 M); attrs format_version,
                        package_version, orientation ("RAS"), shape, voxel_mm, affine,
                        preprocess (JSON), preprocess_hash
    shard-00000.json    partial record of that shard (sha256, subjects, failures), written
                        after the shard; lets a rerun skip it and ``--merge`` assemble
                        the manifest from SLURM array tasks
    plan.json           subjects, shard assignment, splits and config of the run
    manifest.json       shards with sha256, subject -> (shard, index), splits, config
    failures.csv        subject, file, reason of every skipped subject

Shards are written to ``<name>.tmp`` and renamed, with ``track_times=False`` and a
fixed ``libver``, so the same input gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FAILURES_NAME",
    "FORMAT_VERSION",
    "LIBVER",
    "MANIFEST_NAME",
    "Manifest",
    "ShardMismatchError",
    "ShardReader",
    "load_manifest",
    "sha256_file",
    "shard_name",
    "verify_shards",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.csv"
LIBVER = ("earliest", "v110")


class ShardMismatchError(ValueError):
    """A shard does not match its manifest (preprocessing hash, format or contents)."""


def shard_name(index: int) -> str:
    """``shard-00042.h5`` for index 42."""
    return f"shard-{index:05d}.h5"


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """Contents of ``manifest.json`` (see the module docstring).

    Attributes:
        root: folder holding the manifest and the shards.
        shape: (D, H, W) of every volume.
        voxel_mm: voxel size in mm.
        affine: nominal (4, 4) RAS affine as nested lists.
        preprocess: preprocessing config (``PreprocessConfig.to_dict()``).
        preprocess_hash: its ``config_hash()``.
        shards: ``[{"file", "sha256", "n"}]`` in shard order.
        subjects: subject ID -> ``{"shard", "index", "age" (years or None), "age_bin", "sex", "family_id"}``.
        splits: split name -> subject IDs.
        extra: every other top-level key (format_version, split_info, counts, source).
    """

    root: Path
    shape: tuple[int, int, int]
    voxel_mm: float
    affine: list[list[float]]
    preprocess: dict[str, Any]
    preprocess_hash: str
    shards: list[dict[str, Any]]
    subjects: dict[str, dict[str, Any]]
    splits: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def split_ids(self, name: str) -> list[str]:
        """Subject IDs of split ``name``.

        Raises:
            KeyError: unknown split; the message lists the available ones.
        """
        if name not in self.splits:
            raise KeyError(
                f"{self.root / MANIFEST_NAME}: no split '{name}'. Available: {', '.join(sorted(self.splits)) or 'none'}"
            )
        return list(self.splits[name])


def load_manifest(path_or_dir: str | Path) -> Manifest:
    """Read ``manifest.json`` from a shard folder (or the file itself).

    Raises:
        FileNotFoundError: no manifest (preprocessing unfinished or ``--merge`` not run).
        ValueError: not valid JSON, missing keys or a newer format version.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; run `brainage preprocess` (or `brainage preprocess --merge` after a SLURM array)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from exc
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, this version of brainage-hpc reads {FORMAT_VERSION}")
    try:
        subjects = {str(k): dict(v) for k, v in data["subjects"].items()}
        for rec in subjects.values():
            rec["age"] = None if rec.get("age") is None else float(rec["age"])
        known = ("shape", "voxel_mm", "affine", "preprocess", "preprocess_hash", "shards", "subjects", "splits")
        return Manifest(
            root=path.parent,
            shape=tuple(int(s) for s in data["shape"]),  # type: ignore[arg-type]
            voxel_mm=float(data["voxel_mm"]),
            affine=[[float(v) for v in row] for row in data["affine"]],
            preprocess=dict(data["preprocess"]),
            preprocess_hash=str(data["preprocess_hash"]),
            shards=list(data["shards"]),
            subjects=subjects,
            splits={k: [str(s) for s in v] for k, v in data.get("splits", {}).items()},
            extra={k: v for k, v in data.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc


class ShardReader:
    """Random access to preprocessed volumes by subject ID.

    HDF5 files are opened lazily on the first read in the current process and
    cached per process ID, so a reader created in the parent is safe to use in
    forked DataLoader workers (each opens its own handles) and can be pickled
    for spawned ones. A shard whose ``preprocess_hash`` differs from the
    manifest's is refused with :class:`ShardMismatchError`.

    Args:
        root: shard folder (or its ``manifest.json``).
        manifest: an already loaded manifest, to skip reading it again.
    """

    def __init__(self, root: str | Path, manifest: Manifest | None = None) -> None:
        self.manifest = manifest if manifest is not None else load_manifest(root)
        self.root = self.manifest.root
        self._pid: int | None = None
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.manifest.subjects)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pid"], state["_files"] = None, {}
        return state

    def _file(self, shard: int) -> Any:
        import h5py

        pid = os.getpid()
        if pid != self._pid:  # new process (fork): never reuse the parent's HDF5 handles
            self._files, self._pid = {}, pid
        f = self._files.get(shard)
        if f is None:
            if not 0 <= shard < len(self.manifest.shards):
                raise IndexError(f"{self.root}: shard {shard} out of range (0..{len(self.manifest.shards) - 1})")
            path = self.root / self.manifest.shards[shard]["file"]
            f = h5py.File(path, "r")
            found = f.attrs.get("preprocess_hash")
            if found != self.manifest.preprocess_hash:
                made_with = f.attrs.get("preprocess", "?")
                f.close()
                raise ShardMismatchError(
                    f"{path}: preprocess_hash {found!r} differs from the manifest's "
                    f"{self.manifest.preprocess_hash!r} (shard made with {made_with}); rerun `brainage preprocess`"
                )
            self._files[shard] = f
        return f

    def read_index(self, shard: int, index: int) -> np.ndarray:
        """Volume ``index`` of shard ``shard`` as (1, D, H, W) float16."""
        return np.asarray(self._file(shard)["image"][index])

    def read(self, subject_id: str) -> np.ndarray:
        """Volume of ``subject_id`` as (1, D, H, W) float16.

        Raises:
            KeyError: the subject is not in the manifest.
        """
        rec = self.manifest.subjects.get(str(subject_id))
        if rec is None:
            raise KeyError(f"{self.root}: subject {subject_id!r} is not in the manifest")
        return self.read_index(int(rec["shard"]), int(rec["index"]))

    def close(self) -> None:
        """Close the HDF5 handles this process opened."""
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = {}


def _check_shard(root: Path, entry: dict[str, Any], ids: list[str], manifest: Manifest) -> list[str]:
    import h5py

    path = root / entry["file"]
    if not path.is_file():
        return ["file missing"]
    problems = []
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"sha256 mismatch (manifest {entry['sha256'][:12]}..., file {digest[:12]}...)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format_version") != FORMAT_VERSION:
                problems.append(f"format_version {f.attrs.get('format_version')!r} != {FORMAT_VERSION}")
            if f.attrs.get("preprocess_hash") != manifest.preprocess_hash:
                problems.append(
                    f"preprocess_hash {f.attrs.get('preprocess_hash')!r} != manifest {manifest.preprocess_hash!r}"
                )
            img = f["image"]
            want = (len(ids), 1) + tuple(manifest.shape)
            if img.shape != want or img.dtype != np.float16:
                problems.append(f"image is {img.shape} {img.dtype}, expected {want} float16")
                return problems
            stored = [s.decode() if isinstance(s, bytes) else str(s) for s in f["subject_id"][()]]
            if stored != ids:
                problems.append("subject_id does not match the manifest")
            for name, dtype in (("age", np.float32), ("age_bin", np.int8), ("sex", np.int8)):
                if f[name].shape != (len(ids),) or f[name].dtype != dtype:
                    problems.append(
                        f"{name} is {f[name].shape} {f[name].dtype}, expected ({len(ids)},) {np.dtype(dtype)}"
                    )
            for i in range(len(ids)):
                if not np.all(np.isfinite(img[i])):
                    problems.append(f"volume {i} ({ids[i]}) has NaN/Inf voxels")
    except (OSError, KeyError, ValueError) as exc:
        problems.append(f"unreadable ({type(exc).__name__}: {exc})")
    return problems


def verify_shards(root: str | Path, progress: bool = False) -> list[str]:
    """Re-read every shard and check sha256, format, shapes, dtypes, subject IDs and finiteness.

    Args:
        root: shard folder.
        progress: show a tqdm bar over shards.

    Returns:
        One line per problem, each starting with the shard file name; empty when all is well.

    Raises:
        FileNotFoundError, ValueError: no readable manifest.
    """
    from tqdm import tqdm

    manifest = load_manifest(root)
    by_shard: dict[int, list[tuple[int, str]]] = {i: [] for i in range(len(manifest.shards))}
    problems: list[str] = []
    for sid, rec in manifest.subjects.items():
        if rec["shard"] not in by_shard:
            problems.append(f"{MANIFEST_NAME}: subject {sid} points to missing shard {rec['shard']}")
            continue
        by_shard[rec["shard"]].append((rec["index"], sid))
    for name, ids in manifest.splits.items():
        unknown = [s for s in ids if s not in manifest.subjects]
        if unknown:
            problems.append(f"{MANIFEST_NAME}: split '{name}' has {len(unknown)} unknown subject(s), e.g. {unknown[0]}")
    bar = tqdm(manifest.shards, desc="verify", unit="shard", disable=None if progress else True)  # None: tty only
    for i, entry in enumerate(bar):
        ids = [sid for _, sid in sorted(by_shard[i])]
        if [idx for idx, _ in sorted(by_shard[i])] != list(range(len(ids))) or len(ids) != entry["n"]:
            problems.append(f"{entry['file']}: manifest indices are not 0..{entry['n'] - 1}")
            continue
        problems += [f"{entry['file']}: {p}" for p in _check_shard(manifest.root, entry, ids, manifest)]
    return problems
