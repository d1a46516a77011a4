"""HDF5 shards of preprocessed volumes: the format, the manifest, verified lazy reading.

Layout of an output folder::

    shard-00000.h5      image (N, 1, D, H, W) float16, one volume per chunk, HDF5
                        fletcher32 filter (a checksum per chunk, verified on read);
                        image_fletcher32 (N,) uint32, each chunk's checksum as written;
                        image_xxh3 (N,) uint64, each volume's XXH3-64 as written;
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

Integrity at read time: every volume :class:`ShardReader` returns matches the
XXH3-64 recorded when the shard was written (``image_xxh3``); in shards from before
that record, its chunk's Fletcher-32 checksum passes and matches the one recorded at
write time (``image_fletcher32``). Flipped bytes on disk *and* a volume rewritten
through h5py are both refused with a one-line :class:`ShardError` naming the shard
and the subject (a mismatch is told apart as damaged or rewritten with the chunk's
Fletcher-32). Shards written before any checksum existed are read unverified after
one warning (``brainage verify`` still checks their sha256).
Checks of a whole shard set live in :mod:`brainage_hpc.data.shard_checks`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from brainage_hpc.data.checksum import CHECKSUM_BYTES, fletcher32, fletcher32_equal, stored_fletcher32, xxh3

__all__ = [
    "FAILURES_NAME",
    "FORMAT_VERSION",
    "LIBVER",
    "MANIFEST_NAME",
    "Manifest",
    "CHECKSUMS_NAME",
    "DIGESTS_NAME",
    "ShardError",
    "ShardMismatchError",
    "ShardReader",
    "load_manifest",
    "one_line",
    "open_shard",
    "sha256_file",
    "shard_name",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.csv"
LIBVER = ("earliest", "v110")
CHECKSUMS_NAME = "image_fletcher32"  # (N,) uint32: each image chunk's fletcher32 as written
DIGESTS_NAME = "image_xxh3"  # (N,) uint64: each volume's XXH3-64 (float16 little-endian bytes) as written



def _split_worker_message(message: str) -> tuple[str, str]:
    """``(path, problem)`` from the text a DataLoader worker re-raises (whole traceback as message)."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else message
    if "Error: " in last:  # "brainage_hpc.data.shards.ShardError: PATH: PROBLEM"
        last = last.split(": ", 1)[1]
    path, sep, problem = last.partition(": ")
    return (path, problem) if sep else ("?", last)


class ShardError(OSError):
    """A shard file is unreadable, damaged, or disagrees with its manifest.

    An ``OSError`` (``errno`` EIO) whose ``str`` is one line, ``PATH: PROBLEM``,
    so ``brainage`` commands report it without a traceback (exit 1). When a
    DataLoader worker raised it, PyTorch re-creates it in the main process from
    the worker's traceback text; the constructor then keeps only the last line.

    Args:
        path: the shard file (or, with ``problem`` omitted, a worker's message).
        problem: what is wrong, naming the subject when one volume is concerned.
    """

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        if problem is None:
            path, problem = _split_worker_message(str(path))
        super().__init__(errno.EIO, problem, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.filename, self.strerror))


class ShardMismatchError(ShardError):
    """A shard does not match its manifest (preprocessing hash, format, shape or subjects)."""


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


@dataclass
class _OpenShard:
    """One shard opened by one process, and how its volumes are read."""

    shard: int
    path: Path
    file: Any  # h5py.File
    image: Any  # h5py.Dataset (N, 1, D, H, W)
    direct: bool  # one uncompressed volume per chunk: read_direct_chunk, checksum verified here
    checksum: bool  # the fletcher32 filter is on
    expected: np.ndarray | None  # (N,) uint32 checksums as written; None: shard from before they existed
    digests: np.ndarray | None  # (N,) uint64 XXH3-64 of each volume as written; None: shard from before them
    volume_bytes: int
    fd: int | None = None  # our own descriptor of the file, for direct chunk reads with os.preadv
    chunks: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # index -> (byte offset, size, filter mask)


class PendingCheck(NamedTuple):
    """A volume's checksum computing on the reader's helper thread: XXH3-64 when the shard records it, else the
    chunk's Fletcher-32 (``stored``: the Fletcher-32 stored with the chunk; ``payload``: the volume's bytes)."""

    result: Future
    shard: int
    index: int
    stored: int
    payload: np.ndarray


class ShardReader:
    """Random access to preprocessed volumes by subject ID, every read checksum-verified.

    HDF5 files are opened lazily on the first read in the current process and
    cached per process ID, so a reader created in the parent is safe to use in
    forked DataLoader workers (each opens its own handles) and can be pickled
    for spawned ones. A shard whose ``preprocess_hash`` differs from the
    manifest's is refused with :class:`ShardMismatchError`; a damaged volume
    with :class:`ShardError` (see the module docstring).

    Uncompressed shards are read chunk by chunk with ``os.preadv`` at the chunk's
    offset in the file (no HDF5 type conversion, no fresh allocation, the GIL
    released) and each volume is verified here (XXH3-64, or Fletcher-32 in older shards);
    compressed ones go through HDF5's filters, which verify the Fletcher-32, and then the XXH3-64.

    Args:
        root: shard folder (or its ``manifest.json``).
        manifest: an already loaded manifest, to skip reading it again.
    """

    # deferred (threaded) checks only pay off for large chunks: handing one to the helper thread costs ~0.1 ms
    defer_checks_from_bytes = 1 << 20

    def __init__(self, root: str | Path, manifest: Manifest | None = None) -> None:
        self.manifest = manifest if manifest is not None else load_manifest(root)
        self.root = self.manifest.root
        self._pid: int | None = None
        self._files: dict[int, _OpenShard] = {}
        self._scratch: np.ndarray | None = None
        self._names: dict[tuple[int, int], str] | None = None
        self._checker: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.manifest.subjects)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pid"], state["_files"], state["_scratch"], state["_checker"] = None, {}, None, None
        return state

    @property
    def volume_shape(self) -> tuple[int, int, int, int]:
        """(1, D, H, W) of every volume, as the manifest says."""
        return (1, *self.manifest.shape)

    def _path(self, shard: int) -> Path:
        if not 0 <= shard < len(self.manifest.shards):
            raise IndexError(f"{self.root}: shard {shard} out of range (0..{len(self.manifest.shards) - 1})")
        return self.root / self.manifest.shards[shard]["file"]

    def subject_at(self, shard: int, index: int) -> str:
        """Subject ID stored at ``index`` of ``shard`` according to the manifest (for messages)."""
        if self._names is None:
            self._names = {(int(r["shard"]), int(r["index"])): sid for sid, r in self.manifest.subjects.items()}
        return self._names.get((shard, index), f"<index {index}>")

    def _open(self, shard: int) -> _OpenShard:
        pid = os.getpid()
        if pid != self._pid:  # new process (fork): never reuse the parent's HDF5 handles (nor its threads)
            self._files, self._pid, self._scratch, self._checker = {}, pid, None, None
        opened = self._files.get(shard)
        if opened is not None:
            return opened
        path = self._path(shard)
        f = open_shard(path)
        try:
            check_preprocess_hash(f, path, self.manifest)
            img = f["image"]
            shape = tuple(int(s) for s in img.shape[2:])
            direct = (
                img.chunks == (1, 1, *shape)
                and img.compression is None
                and not img.shuffle
                and img.scaleoffset is None
                and img.dtype == np.dtype("<f2")
                and sys.byteorder == "little"
            )
            expected = np.asarray(f[CHECKSUMS_NAME][()], dtype=np.uint32) if CHECKSUMS_NAME in f else None
            digests = np.asarray(f[DIGESTS_NAME][()], dtype=np.uint64) if DIGESTS_NAME in f else None
            for name, rec in ((CHECKSUMS_NAME, expected), (DIGESTS_NAME, digests)):
                if rec is not None and rec.shape != img.shape[:1]:
                    raise ValueError(f"{name} holds {rec.shape} values for {img.shape[0]} volumes")
            opened = _OpenShard(shard, path, f, img, direct, bool(img.fletcher32), expected, digests, 2 * math.prod(shape),
                                os.open(path, os.O_RDONLY) if direct else None)
        except ShardError:
            f.close()
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            f.close()
            raise ShardError(path, f"damaged HDF5 structure ({one_line(exc)}); restore it or rerun `brainage preprocess`") from None
        self._files[shard] = opened
        return opened

    def _buffer(self, nbytes: int) -> np.ndarray:
        if self._scratch is None or self._scratch.size < nbytes:
            self._scratch = np.empty(nbytes, dtype=np.uint8)
        return self._scratch[:nbytes]

    def read_into(self, shard: int, index: int, out: np.ndarray, padded: bool = False,
                  checks: list[PendingCheck] | None = None) -> None:
        """Put volume ``index`` of ``shard`` into ``out`` after verifying its checksum.

        Args:
            shard: shard number in the manifest.
            index: volume index inside the shard.
            out: writable, C-contiguous; float16 of (1, D, H, W) (any shape of that size), or
                with ``padded`` a uint8 buffer of at least the volume's bytes + 4.
            padded: read the chunk straight into ``out`` (no copy through a scratch buffer):
                the volume lands in its first bytes, and the 4 bytes after it may be
                overwritten (the chunk's checksum). Fill a batch slot by slot, in order.
            checks: with ``padded`` and a volume of at least :attr:`defer_checks_from_bytes`,
                defer the checksum pass: it runs on a helper thread (xxhash and numpy
                release the GIL) while the caller reads the next chunk, and is appended
                here; :meth:`finish_checks` must follow before the data is used (it
                gives the same verdicts as the inline path).

        Raises:
            ShardError: the shard cannot be read, or the volume is damaged or was rewritten.
        """
        o = self._open(shard)
        if not 0 <= index < o.image.shape[0]:
            raise IndexError(f"{o.path}: volume {index} out of range (0..{o.image.shape[0] - 1})")
        need = o.volume_bytes + CHECKSUM_BYTES if padded else o.volume_bytes
        if not out.flags.c_contiguous or out.nbytes < need or (not padded and out.dtype != np.float16):
            raise ValueError(f"out must be a C-contiguous {'uint8' if padded else 'float16'} array of "
                             f"{'at least ' if padded else ''}{need} bytes, got {out.dtype} {out.shape}")
        flat = out.reshape(-1).view(np.uint8)
        try:
            if o.direct and padded:
                self._read_chunk(o, index, flat, checks)
            elif o.direct:
                np.copyto(flat, self._read_chunk(o, index)[: o.volume_bytes])
            else:
                out = flat[: o.volume_bytes].view(np.float16)
                o.image.read_direct(out.reshape(o.image.shape[1:]), source_sel=np.s_[index])
                # HDF5 verified the chunk; was it rewritten since? With the XXH3-64 record the raw chunk is read
                # again only on a mismatch, to tell a rewrite from damage.
                intact = o.digests is None or xxh3(out) == int(o.digests[index])
                if o.checksum and o.expected is not None and (o.digests is None or not intact):
                    self._check_expected(o, index, stored_fletcher32(o.image.id.read_direct_chunk((index, 0, 0, 0, 0))[1]))
                if not intact:
                    raise self._damaged(o, index)
        except ShardError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            what = f"unreadable ({one_line(exc)})"
            if "Fletcher32" in str(exc) or self._raw_checksum_fails(o, index):  # HDF5 often says only "filter failed"
                what = "checksum mismatch, the volume is damaged"
            raise ShardError(o.path, f"subject {self.subject_at(shard, index)} (volume {index}): {what}; {self._fix}") from None

    @staticmethod
    def _raw_checksum_fails(o: _OpenShard, index: int) -> bool:
        if not o.checksum:
            return False
        try:
            raw = np.frombuffer(o.image.id.read_direct_chunk((index, 0, 0, 0, 0))[1], dtype=np.uint8)
        except (OSError, ValueError, RuntimeError):
            return False
        return not fletcher32_equal(fletcher32(raw[:-CHECKSUM_BYTES]), stored_fletcher32(raw))

    @property
    def _fix(self) -> str:
        return f"restore the shard or rerun `brainage preprocess` (`brainage verify {self.root}` lists all damage)"

    def _chunk(self, o: _OpenShard, index: int) -> tuple[int, int, int]:
        """(byte offset, size, filter mask) of volume ``index``'s chunk, looked up once per process."""
        loc = o.chunks.get(index)
        if loc is None:
            info = o.image.id.get_chunk_info_by_coord((index, 0, 0, 0, 0))
            if info.byte_offset is None:
                raise ShardError(o.path, f"subject {self.subject_at(o.shard, index)} (volume {index}): the chunk was "
                                         f"never written; {self._fix}")
            loc = o.chunks[index] = (int(info.byte_offset), int(info.size), int(info.filter_mask))
        return loc

    def prefetch(self, locations: list[tuple[int, int]]) -> None:
        """Ask the kernel to start reading these volumes' chunks now (``posix_fadvise(WILLNEED)``), all at once.

        A cold batch then reads its chunks in parallel instead of one after the other.
        """
        for shard, index in locations:
            o = self._open(shard)
            if o.fd is not None:
                offset, size, _ = self._chunk(o, index)
                os.posix_fadvise(o.fd, offset, size, os.POSIX_FADV_WILLNEED)

    def _read_chunk(self, o: _OpenShard, index: int, into: np.ndarray | None = None,
                    checks: list[PendingCheck] | None = None) -> np.ndarray:
        """The raw chunk of volume ``index`` (payload + checksum when filtered), verified (or its check appended
        to ``checks``); in ``into`` or a scratch buffer.

        The bytes come from the chunk's place in the file through ``os.preadv``, which releases the GIL (h5py's
        ``read_direct_chunk`` holds it), so the helper thread checks the previous chunk meanwhile.
        """
        need = o.volume_bytes + (CHECKSUM_BYTES if o.checksum else 0)
        buf = self._buffer(need) if into is None else into[:need]
        offset, size, mask = self._chunk(o, index)
        if mask != 0 or size != need:
            raise ShardError(o.path, f"subject {self.subject_at(o.shard, index)} (volume {index}): chunk of {size} bytes "
                                     f"(filter mask {mask}), expected {need}; {self._fix}")
        assert o.fd is not None
        got = 0
        view = memoryview(buf)
        while got < need:
            n = os.preadv(o.fd, [view[got:]], offset + got)
            if n == 0:
                raise ShardError(o.path, f"subject {self.subject_at(o.shard, index)} (volume {index}): the file ends "
                                         f"inside the chunk (truncated); {self._fix}")
            got += n
        if o.checksum or o.digests is not None:
            stored = stored_fletcher32(buf) if o.checksum else 0  # now: reading the next slot overwrites it
            payload = buf[: o.volume_bytes]
            verify = xxh3 if o.digests is not None else fletcher32
            if checks is not None and o.volume_bytes >= self.defer_checks_from_bytes:
                checks.append(PendingCheck(self._helper().submit(verify, payload), o.shard, index, stored, payload))
                return buf
            self._verdict(o, index, verify(payload), stored, payload)
        return buf

    def _verdict(self, o: _OpenShard, index: int, computed: int, stored: int, payload: np.ndarray) -> None:
        """Raise if volume ``index`` (``computed``: its XXH3-64 when the shard records them, else its Fletcher-32) is
        damaged or was rewritten; a digest mismatch is told apart with the chunk's Fletcher-32."""
        if o.digests is not None:
            if computed == int(o.digests[index]):
                if o.checksum and o.expected is not None and not fletcher32_equal(stored, int(o.expected[index])):
                    raise self._damaged(o, index)  # intact volume, damaged chunk checksum: HDF5 itself would refuse it
                return
            if o.checksum and fletcher32_equal(fletcher32(payload), stored):
                self._check_expected(o, index, stored)  # a valid chunk unlike the one written: rewritten through h5py
            raise self._damaged(o, index)
        if not fletcher32_equal(computed, stored):
            raise self._damaged(o, index)
        self._check_expected(o, index, stored)

    def _damaged(self, o: _OpenShard, index: int) -> ShardError:
        return ShardError(o.path, f"subject {self.subject_at(o.shard, index)} (volume {index}): checksum mismatch, "
                                  f"the volume is damaged; {self._fix}")

    def _helper(self) -> ThreadPoolExecutor:
        if self._checker is None:
            self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksum")
        return self._checker

    def finish_checks(self, checks: list[PendingCheck]) -> None:
        """Wait for the deferred checksums of ``checks`` (all of them) and empty the list.

        Raises:
            ShardError: the first volume, in read order, whose checksum does not match (damaged), or
                whose chunk checksum differs from the one recorded at write time (rewritten).
        """
        first: ShardError | None = None
        for check in checks:
            computed = check.result.result()
            if first is not None:
                continue  # wait for every pass: the buffer may be reused once this returns
            try:
                self._verdict(self._files[check.shard], check.index, computed, check.stored, check.payload)
            except ShardError as exc:
                first = exc
        checks.clear()
        if first is not None:
            raise first

    def _check_expected(self, o: _OpenShard, index: int, stored: int) -> None:
        if o.expected is not None and not fletcher32_equal(stored, int(o.expected[index])):
            raise ShardError(
                o.path,
                f"subject {self.subject_at(o.shard, index)} (volume {index}): the volume was rewritten after preprocessing "
                f"(chunk checksum {stored:08x}, written as {int(o.expected[index]):08x}); {self._fix}",
            )

    def read_index(self, shard: int, index: int) -> np.ndarray:
        """Volume ``index`` of shard ``shard`` as (1, D, H, W) float16 (verified; a new array)."""
        out = np.empty(self.volume_shape, dtype=np.float16)
        self.read_into(shard, index, out)
        return out

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
            for o in self._files.values():
                o.file.close()
                if o.fd is not None:
                    os.close(o.fd)
            if self._checker is not None:
                self._checker.shutdown(wait=True)
        self._files, self._checker = {}, None


def one_line(exc: BaseException) -> str:
    """One line of an h5py/OS exception: its message without HDF5's error stack."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def check_preprocess_hash(f: Any, path: Path, manifest: Manifest) -> None:
    """Refuse a shard written by another preprocessing than its manifest names (one line).

    Raises:
        ShardMismatchError: the shard's ``preprocess_hash`` attribute differs.
    """
    found = f.attrs.get("preprocess_hash")
    if found != manifest.preprocess_hash:
        raise ShardMismatchError(
            path,
            f"preprocess_hash {found!r} differs from the manifest's {manifest.preprocess_hash!r} "
            f"(shard made with {f.attrs.get('preprocess', '?')}); rerun `brainage preprocess`",
        )


def open_shard(path: Path) -> Any:
    """``h5py.File(path, "r")``, or a one-line :class:`ShardError` when it is missing, corrupt or truncated."""
    import h5py

    if not path.is_file():
        raise ShardError(path, "missing (listed in manifest.json); restore it or rerun `brainage preprocess`")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ShardError(
            path, f"not a readable HDF5 file, corrupt or truncated ({one_line(exc)}); restore it or rerun `brainage preprocess`"
        ) from None
