"""Checks of a shard set against its manifest: a quick structural one before reading, a full one (``verify``).

* :func:`check_shards` opens each shard once (no volume read): it opens as HDF5
  (a corrupt header or a truncated file does not), format version, preprocessing
  hash, image shape and dtype against the manifest's shape, subject IDs at the
  manifest's indices. :class:`~brainage_hpc.data.dataset.ShardDataset` runs it in
  the main process, so a bad shard is a one-line :class:`ShardError` before any
  DataLoader worker starts.
* :func:`verify_shards` (``brainage verify``) re-reads everything: sha256 of
  each file, structure, every volume's checksum and finiteness.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from brainage_hpc.data.shards import (
    CHECKSUMS_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ShardError,
    ShardMismatchError,
    ShardReader,
    check_preprocess_hash,
    load_manifest,
    one_line,
    open_shard,
    sha256_file,
)

__all__ = ["check_shards", "verify_shards", "warn_if_unchecked"]

log = logging.getLogger(__name__)
_WARNED_UNCHECKED: set[str] = set()  # shard folders already warned about (one warning per process)


def check_shards(manifest: Manifest, shards: Iterable[int] | None = None) -> list[int]:
    """Open ``shards`` (default: all) once and check them against ``manifest``; nothing stays open.

    Returns:
        The shards without per-volume checksums (written before they existed).

    Raises:
        ShardError: the first shard that fails, naming the file and the problem.
    """
    by_shard: dict[int, list[tuple[int, str]]] = {}
    for sid, rec in manifest.subjects.items():
        by_shard.setdefault(int(rec["shard"]), []).append((int(rec["index"]), sid))
    unchecked = []
    for k in sorted(set(range(len(manifest.shards)) if shards is None else shards)):
        if not 0 <= k < len(manifest.shards):
            raise IndexError(f"{manifest.root}: shard {k} out of range (0..{len(manifest.shards) - 1})")
        if not _check_one(manifest.root / manifest.shards[k]["file"], manifest, by_shard.get(k, [])):
            unchecked.append(k)
    return unchecked


def warn_if_unchecked(manifest: Manifest, unchecked: list[int]) -> None:
    """One warning per shard folder and process when some shards carry no checksums."""
    key = str(manifest.root)
    if unchecked and key not in _WARNED_UNCHECKED:
        _WARNED_UNCHECKED.add(key)
        log.warning(
            "%d of %d shards in %s (e.g. %s) have no per-volume checksum (written before brainage-hpc "
            "checksummed shards): damaged volumes cannot be detected while reading; `brainage verify %s` "
            "checks whole files, a new `brainage preprocess` run adds checksums",
            len(unchecked), len(manifest.shards), manifest.root, manifest.shards[unchecked[0]]["file"], manifest.root,
        )


def _check_one(path: Path, manifest: Manifest, members: list[tuple[int, str]]) -> bool:
    """Check one shard against the manifest (see :func:`check_shards`); True when it has checksums."""
    f = open_shard(path)
    try:
        version = f.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise ShardMismatchError(path, f"format_version {version!r}, this version of brainage-hpc reads {FORMAT_VERSION}")
        check_preprocess_hash(f, path, manifest)
        img = f["image"]
        stored_shape = tuple(int(s) for s in img.shape[2:])
        if stored_shape != tuple(manifest.shape):
            have, want = "x".join(map(str, stored_shape)), "x".join(map(str, manifest.shape))
            raise ShardMismatchError(
                path,
                f"volumes are {have} but {MANIFEST_NAME} says {want} (manifest edited, or shards of another run); "
                "restore the manifest or rerun `brainage preprocess`",
            )
        if img.ndim != 5 or img.shape[1] != 1 or img.dtype != np.float16:
            raise ShardMismatchError(path, f"image is {img.shape} {img.dtype}, expected (N, 1, {', '.join(map(str, manifest.shape))}) float16")
        if members:
            stored = f["subject_id"][()]
            last = max(i for i, _ in members)
            if last >= len(stored) or last >= img.shape[0]:
                raise ShardMismatchError(path, f"holds {img.shape[0]} volumes but {MANIFEST_NAME} lists index {last}")
            for index, sid in members:
                name = stored[index].decode() if isinstance(stored[index], bytes) else str(stored[index])
                if name != sid:
                    raise ShardMismatchError(path, f"volume {index} is subject {name}, {MANIFEST_NAME} says {sid}")
        return img.shape[0] == 0 or (bool(img.fletcher32) and CHECKSUMS_NAME in f)
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ShardError(path, f"damaged HDF5 structure ({one_line(exc)}); restore it or rerun `brainage preprocess`") from None
    finally:
        f.close()


def _check_shard(reader: ShardReader, k: int, entry: dict[str, Any], ids: list[str]) -> list[str]:
    import h5py

    root, manifest = reader.root, reader.manifest
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
    except (OSError, KeyError, ValueError) as exc:
        return [*problems, f"unreadable ({type(exc).__name__}: {one_line(exc)})"]
    vol = np.empty(reader.volume_shape, dtype=np.float16)
    for i in range(len(ids)):
        try:
            reader.read_into(k, i, vol)  # checksum verified, and compared with the one recorded at write time
        except ShardError as exc:
            problems.append(str(exc.strerror).split("; restore")[0])
            continue
        if not np.all(np.isfinite(vol)):
            problems.append(f"volume {i} ({ids[i]}) has NaN/Inf voxels")
    reader.close()
    return problems


def verify_shards(root: str | Path, progress: bool = False) -> list[str]:
    """Re-read every shard and check sha256, format, shapes, dtypes, subject IDs, per-volume checksums and finiteness.

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
    reader = ShardReader(manifest.root, manifest=manifest)
    bar = tqdm(manifest.shards, desc="verify", unit="shard", disable=None if progress else True)  # None: tty only
    for i, entry in enumerate(bar):
        ids = [sid for _, sid in sorted(by_shard[i])]
        if [idx for idx, _ in sorted(by_shard[i])] != list(range(len(ids))) or len(ids) != entry["n"]:
            problems.append(f"{entry['file']}: manifest indices are not 0..{entry['n'] - 1}")
            continue
        problems += [f"{entry['file']}: {p}" for p in _check_shard(reader, i, entry, ids)]
    return problems
