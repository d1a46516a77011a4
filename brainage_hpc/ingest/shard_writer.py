"""Writing the shard set: HDF5 shards, their sidecars, ``failures.csv``, canonical JSON.

The format itself (file layout, manifest, reader, verification) is described in
:mod:`brainage_hpc.data.shards`; this module only produces it. Every file is written
to a temp name in the same folder and renamed, so a ``kill -9`` leaves the old file or
the new one, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from brainage_hpc import __version__
from brainage_hpc.data.checksum import fletcher32, fletcher32_equal, stored_fletcher32, xxh3
from brainage_hpc.data.shards import CHECKSUMS_NAME, DIGESTS_NAME, FORMAT_VERSION, LIBVER, sha256_file, shard_name

__all__ = ["atomic_write_text", "read_partial", "write_failures", "write_json", "write_partial", "write_shard"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write canonical JSON (sorted keys, no NaN) so equal data gives equal bytes."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")


def write_shard(
    path: str | Path,
    images: np.ndarray,
    subjects: list[dict[str, Any]],
    *,
    voxel_mm: float,
    affine: np.ndarray,
    preprocess: dict[str, Any],
    preprocess_hash: str,
    compression: str = "none",
) -> str:
    """Write one shard atomically (``path + '.tmp'``, fsync, rename) and return its sha256.

    ``image`` gets HDF5's fletcher32 filter (one checksum per volume chunk, checked
    by HDF5 on every filtered read and by :class:`~brainage_hpc.data.shards.ShardReader`
    on its direct reads), and ``image_fletcher32`` records those checksums as
    written, so a volume rewritten later through h5py (which recomputes the chunk
    checksum) is refused too. ``image_xxh3`` records each volume's XXH3-64 (of the
    float16 volume as given), which the direct read path verifies instead (faster,
    and it sees the 0x0000 <-> 0xFFFF word changes Fletcher-32 cannot).

    Args:
        path: final ``shard-XXXXX.h5`` path.
        images: (N, 1, D, H, W) float16.
        subjects: N dicts with ``id``, ``age`` (years or ``None``), ``age_bin``, ``sex``, and
            optionally ``cohort`` and ``site`` (stored as utf-8 datasets when any subject has them).
        voxel_mm: voxel size of the volumes in mm.
        affine: (4, 4) nominal RAS affine of the grid.
        preprocess: preprocessing config as a dict (stored as JSON).
        preprocess_hash: its hash, checked by readers.
        compression: ``"none"``, ``"lzf"`` or ``"gzip"``.

    Returns:
        Hex sha256 of the written file.
    """
    import h5py

    if compression not in ("none", "lzf", "gzip"):
        raise ValueError(f"compression={compression!r} is not valid. Valid: none, lzf, gzip")
    images = np.asarray(images, dtype=np.float16)
    n = len(subjects)
    if images.ndim != 5 or images.shape[0] != n or images.shape[1] != 1:
        raise ValueError(f"{path}: images must be (N={n}, 1, D, H, W), got {images.shape}")
    shape = tuple(int(s) for s in images.shape[2:])
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    kw: dict[str, Any] = {"track_times": False, "fletcher32": True}
    if compression == "gzip":
        kw.update(compression="gzip", compression_opts=4, shuffle=True)
    elif compression == "lzf":
        kw.update(compression="lzf", shuffle=True)
    ages = np.array([np.nan if s["age"] is None else s["age"] for s in subjects], dtype=np.float32)
    with h5py.File(tmp, "w", libver=LIBVER, track_order=False) as f:
        if n:
            f.create_dataset("image", shape=images.shape, dtype=np.float16, chunks=(1, 1) + shape, **kw)
        else:  # every subject of this shard failed: an empty, unchunked dataset keeps the layout uniform
            f.create_dataset("image", shape=images.shape, dtype=np.float16, track_times=False)
        for i in range(n):  # one chunk per volume, written in order
            f["image"][i] = images[i]
        f.flush()
        f.create_dataset(CHECKSUMS_NAME, data=_chunk_checksums(f["image"], n), dtype=np.uint32, track_times=False)
        digests = np.array([xxh3(np.ascontiguousarray(images[i], dtype="<f2")) for i in range(n)], dtype=np.uint64)
        f.create_dataset(DIGESTS_NAME, data=digests, dtype=np.uint64, track_times=False)
        f.create_dataset(
            "subject_id",
            data=np.array([str(s["id"]) for s in subjects], dtype=object),
            dtype=h5py.string_dtype("utf-8"),
            track_times=False,
        )
        f.create_dataset("age", data=ages, dtype=np.float32, track_times=False)
        f.create_dataset("age_bin", data=np.array([s["age_bin"] for s in subjects], dtype=np.int8), track_times=False)
        f.create_dataset("sex", data=np.array([s["sex"] for s in subjects], dtype=np.int8), track_times=False)
        for key in ("cohort", "site"):  # contract 3: optional, readers accept shards without them
            if any(s.get(key) is not None for s in subjects):
                f.create_dataset(
                    key,
                    data=np.array([str(s.get(key) or "") for s in subjects], dtype=object),
                    dtype=h5py.string_dtype("utf-8"),
                    track_times=False,
                )
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["package_version"] = __version__
        f.attrs["orientation"] = "RAS"
        f.attrs["shape"] = np.asarray(shape, dtype=np.int64)
        f.attrs["voxel_mm"] = float(voxel_mm)
        f.attrs["affine"] = np.asarray(affine, dtype=np.float64)
        f.attrs["preprocess"] = json.dumps(preprocess, sort_keys=True)
        f.attrs["preprocess_hash"] = preprocess_hash
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def _chunk_checksums(image: Any, n: int) -> np.ndarray:
    """(n,) uint32: the fletcher32 HDF5 stored with each chunk, checked against a recomputation."""
    sums = np.zeros(n, dtype=np.uint32)
    for i in range(n):
        mask, raw = image.id.read_direct_chunk((i, 0, 0, 0, 0))
        stored = stored_fletcher32(raw)
        if mask == 0 and not fletcher32_equal(fletcher32(raw[:-4]), stored):  # never seen: HDF5 and numpy disagree
            raise RuntimeError(f"fletcher32 of chunk {i} does not match HDF5's ({stored:08x})")
        sums[i] = stored
    return sums


def _partial_path(root: Path, index: int) -> Path:
    return root / shard_name(index).replace(".h5", ".json")


def write_partial(root: str | Path, index: int, record: dict[str, Any]) -> None:
    """Write the sidecar ``shard-XXXXX.json`` (after the shard itself) atomically."""
    write_json(_partial_path(Path(root), index), record)


def read_partial(root: str | Path, index: int) -> dict[str, Any] | None:
    """The sidecar of shard ``index``, or ``None`` if absent or unreadable (the shard is then redone)."""
    path = _partial_path(Path(root), index)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_failures(path: str | Path, failures: list[dict[str, str]]) -> None:
    """Write ``failures.csv`` (columns subject, file, reason), sorted, atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["subject", "file", "reason"])
    for row in sorted(failures, key=lambda r: (r["subject"], r["file"], r["reason"])):
        w.writerow([row["subject"], row["file"], row["reason"]])
    atomic_write_text(path, buf.getvalue())
