"""Lazy HDF5 dataset over the shards (the sampler lives in :mod:`brainage_hpc.data.sampler`).

:class:`ShardDataset` reads the volumes of one split from the shards written
by preprocessing: one item at a time (``ds[i]``, float32, for evaluation and
interpretation) or a whole batch at once (:meth:`ShardDataset.read_batch`, the
training path: volumes copied straight from their chunks into one fp16 batch
tensor, checksums verified, metadata gathered with one numpy index). Every shard
of the split is checked against the manifest when the dataset is built, in the
main process, so a damaged or mismatched shard is a one-line error before any
worker starts. HDF5 handles cannot cross ``fork`` or pickling, so the reader is
created lazily in the process that uses it (main process or DataLoader worker)
and kept open there. An optional in-memory cache holds only the volumes of this
rank (fp16, one tensor that forked DataLoader workers share without copying).

"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from brainage_hpc.data.ages import bin_to_class
from brainage_hpc.data.batch_buffers import BufferPool, recycle
from brainage_hpc.data.checksum import CHECKSUM_BYTES
from brainage_hpc.data.sampler import BrainSampler
from brainage_hpc.data.shard_checks import check_shards, warn_if_unchecked
from brainage_hpc.data.shards import Manifest, PendingCheck, ShardError, ShardReader, load_manifest

__all__ = ["TASKS", "BrainSampler", "ShardDataset"]

log = logging.getLogger(__name__)

TASKS = ("regress", "classify4", "classify2")


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ShardDataset(Dataset):
    """One split of the shards as MONAI-style dicts.

    Args:
        manifest: a loaded :class:`Manifest`, or the shard folder / ``manifest.json`` path.
        split: name of a split in the manifest (``"train"``, ``"val"``, ``"test"``).
        task: ``"regress"``, ``"classify4"`` or ``"classify2"``; decides ``"label"``.
        transform: called on the item dict (``"image"`` is (1, D, H, W) float32)
            before it is returned, e.g. :func:`~brainage_hpc.data.transforms.train_transforms`.
        cache: keep the volumes of ``subset`` in memory (fp16) after one read.
        subset: indices (into this split) to cache; ``None`` caches the whole split.
            Indexing always covers the whole split.

    Items (``ds[i]``):
        ``image`` float32 (1, D, H, W); ``age`` float32 scalar, years (NaN when
        only the bin is known); ``age_bin`` int64, 4-class seed bin; ``label``
        int64, the class of ``task`` (the 4-class bin for ``regress``); ``sex``
        float32, 0 F / 1 M; ``subject_id`` str.

    ``ds[(i, seed)]`` reseeds the transform with ``seed`` first, which makes the
    augmentation of one item independent of worker count and resume point.
    """

    def __init__(
        self,
        manifest: Manifest | str | Path,
        split: str,
        task: str = "regress",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        cache: bool = False,
        subset: Sequence[int] | None = None,
    ) -> None:
        if task not in TASKS:
            hint = difflib.get_close_matches(str(task), TASKS, n=1)
            did = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ValueError(f"Unknown task '{task}'.{did} Valid: {', '.join(TASKS)}")
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        if split not in self.manifest.splits:
            valid = ", ".join(sorted(self.manifest.splits)) or "none"
            raise ValueError(f"Split '{split}' is not in {self.manifest.root}/manifest.json. Valid: {valid}")
        self.root = Path(self.manifest.root)
        self.split = split
        self.task = task
        self.transform = transform
        self.subject_ids: list[str] = [str(s) for s in self.manifest.split_ids(split)]
        if not self.subject_ids:
            raise ValueError(f"Split '{split}' of {self.root} is empty")
        subjects = self.manifest.subjects
        missing = [s for s in self.subject_ids if s not in subjects]
        if missing:
            raise ValueError(f"Split '{split}' names {len(missing)} subjects absent from the manifest, e.g. {missing[:3]}")
        rows = [subjects[s] for s in self.subject_ids]
        self._shard = np.array([int(r["shard"]) for r in rows], dtype=np.int64)
        self._index = np.array([int(r["index"]) for r in rows], dtype=np.int64)
        self.ages = np.array([np.nan if r.get("age") is None else float(r["age"]) for r in rows], dtype=np.float32)
        self.age_bins = np.array([int(r["age_bin"]) for r in rows], dtype=np.int64)
        self.sexes = np.array([float(r["sex"]) for r in rows], dtype=np.float32)
        if task == "classify2":
            self.labels = np.array([bin_to_class(int(b), 2) for b in self.age_bins], dtype=np.int64)
        else:
            self.labels = self.age_bins.copy()
        self.shape: tuple[int, int, int] = tuple(int(v) for v in self.manifest.shape)  # type: ignore[assignment]
        self._reader: ShardReader | None = None
        self._reader_pid: int | None = None
        self._cache: torch.Tensor | None = None
        self._cache_pos = np.full(len(self.subject_ids), -1, dtype=np.int64)
        self.pin_batches = False  # read_batch allocates pinned memory (set by the loader for CUDA without workers)
        # read_batch takes its fp16 batches from this pool; only a consumer that calls batch_buffers.recycle()
        # gets buffers back (the loader's device step does); None: a fresh tensor per batch
        self.buffer_pool: BufferPool | None = None
        warn_if_unchecked(self.manifest, check_shards(self.manifest, np.unique(self._shard).tolist()))
        if cache:
            self.cache_volumes(range(len(self)) if subset is None else subset)

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def volume_bytes(self) -> int:
        """Bytes of one stored (fp16) volume."""
        return 2 * math.prod(self.shape)

    def _get_reader(self) -> ShardReader:
        pid = os.getpid()
        if self._reader is None or self._reader_pid != pid:
            self._reader = ShardReader(self.root, manifest=self.manifest)  # a handle inherited through fork is dropped, never used
            self._reader_pid = pid
        return self._reader

    def close(self) -> None:
        """Close this process's HDF5 handles (they reopen on the next read)."""
        if self._reader is not None and self._reader_pid == os.getpid():
            close = getattr(self._reader, "close", None)
            if callable(close):
                close()
        self._reader = None
        self._reader_pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # h5py handles cannot be pickled (spawn workers reopen)
        state["_reader_pid"] = None
        return state

    def read_volume(self, i: int) -> np.ndarray | torch.Tensor:
        """The stored volume of item ``i``, (1, D, H, W) float16 (from the cache when held)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for split '{self.split}' of {len(self)} subjects")
        pos = self._cache_pos[i]
        if self._cache is not None and pos >= 0:
            return self._cache[pos]
        return self._get_reader().read_index(int(self._shard[i]), int(self._index[i]))

    def _read_into(self, i: int, out: np.ndarray, padded: bool = False, checks: list[PendingCheck] | None = None) -> None:
        """Volume ``i`` into ``out``: float16 (1, D, H, W), or with ``padded`` uint8 of its bytes + 4 (see ShardReader)."""
        pos = self._cache_pos[i]
        if self._cache is not None and pos >= 0:
            dest = out.reshape(-1).view(np.uint8)[: self.volume_bytes].view(np.float16) if padded else out.reshape(-1)
            np.copyto(dest, self._cache[pos].numpy().reshape(-1))
        else:
            self._get_reader().read_into(int(self._shard[i]), int(self._index[i]), out, padded=padded, checks=checks)

    def read_batch(self, keys: Sequence[int | tuple[int, int]], lease: tuple[int, int] | None = None) -> dict[str, Any]:
        """Items ``keys`` (indices, or ``(index, transform_seed)``) as one batch.

        The volumes are copied from their chunks straight into one (B, 1, D, H, W)
        tensor; each chunk's checksum is computed on a helper thread while the next
        chunk is read, and all are verified before the batch is returned. The tensor
        is in shared memory inside a DataLoader worker (so sending it to the main
        process copies nothing), pinned memory when :attr:`pin_batches` is set, plain
        memory otherwise; it comes from :attr:`buffer_pool` when one is set (hand it
        back with :func:`brainage_hpc.data.batch_buffers.recycle`). Without a transform the
        image stays float16, as stored; convert it on the device (see
        :func:`brainage_hpc.data.loader.batch_to_device`). ``lease`` is the (loader token, iteration) the batch is
        for (see :mod:`brainage_hpc.data.batch_buffers`): it lets the pool reuse buffers that an abandoned
        iteration prefetched and nobody received.

        Returns:
            ``image`` (B, 1, D, H, W) float16, or float32 when :attr:`transform`
            ran (per item, reseeded with the item's seed); ``age`` (B,) float32
            years; ``age_bin`` (B,) int64; ``label`` (B,) int64; ``sex`` (B,)
            float32; ``subject_id`` list of B str.
        """
        pairs = [(int(k[0]), int(k[1])) if isinstance(k, tuple) else (int(k), None) for k in keys]
        idx = np.array([i for i, _ in pairs], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}) for split '{self.split}'")
        shape = (len(pairs), 1, *self.shape)
        t = self.transform
        if t is None:  # chunks straight into their slots, in slot order (each may spill 4 bytes into the next)
            vb = self.volume_bytes
            nbytes = len(pairs) * vb + CHECKSUM_BYTES
            pool = self.buffer_pool
            raw = pool.take(nbytes, self.pin_batches, lease) if pool is not None else _batch_tensor((nbytes,), torch.uint8, self.pin_batches)
            image = raw[: len(pairs) * vb].view(torch.float16).view(shape)  # (B, 1, D, H, W)
            self._fill_slots(idx, raw)
        else:
            image = _batch_tensor(shape, torch.float32, self.pin_batches)  # (B, 1, D, H, W)
            vol = np.empty(shape[1:], dtype=np.float16)
            for j, (i, seed) in enumerate(pairs):
                self._read_into(i, vol)
                if seed is not None and hasattr(t, "set_random_state"):
                    t.set_random_state(seed=seed)
                out = t({"image": torch.from_numpy(vol).float()})["image"]
                image[j].copy_(out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out))
        return {
            "image": image,
            "age": torch.from_numpy(self.ages[idx]),
            "age_bin": torch.from_numpy(self.age_bins[idx]),
            "label": torch.from_numpy(self.labels[idx]),
            "sex": torch.from_numpy(self.sexes[idx]),
            "subject_id": [self.subject_ids[i] for i in idx],
        }

    def _fill_slots(self, idx: np.ndarray, raw: torch.Tensor) -> None:
        """Volumes ``idx`` into consecutive slots of ``raw`` (uint8), every checksum verified before returning."""
        vb = self.volume_bytes
        flat = raw.numpy()
        checks: list[PendingCheck] = []
        try:
            uncached = [int(i) for i in idx if self._cache is None or self._cache_pos[i] < 0]
            if len(uncached) > 1:  # cold cache: the kernel fetches all chunks at once
                self._get_reader().prefetch([(int(self._shard[i]), int(self._index[i])) for i in uncached])
            last = len(idx) - 1  # its check runs here, while the helper thread finishes the others
            for j, i in enumerate(idx):
                try:
                    self._read_into(int(i), flat[j * vb : (j + 1) * vb + CHECKSUM_BYTES], padded=True,
                                    checks=checks if j < last else None)
                except ShardError:
                    if checks:  # an earlier volume's verdict comes first, as in read order
                        self._get_reader().finish_checks(checks)
                    raise
            if checks:
                self._get_reader().finish_checks(checks)
        except BaseException:
            for check in checks:  # the helper thread must be done with the buffer before it is reused
                check.result.exception()
            recycle(raw)  # nobody will see this batch
            raise

    def cache_volumes(self, indices: Sequence[int] | Iterator[int] | range | np.ndarray) -> None:
        """Read the volumes of ``indices`` once into an in-memory fp16 cache (replacing any previous)."""
        idx = np.unique(np.asarray(list(indices), dtype=np.int64))
        if idx.size and (idx[0] < 0 or idx[-1] >= len(self)):
            raise IndexError(f"cache indices must lie in [0, {len(self)}) for split '{self.split}'")
        need = idx.size * self.volume_bytes
        avail = _mem_available_bytes()
        log.info(
            "caching %d volumes of split '%s' in memory: %.2f GiB (available: %s)",
            idx.size, self.split, need / 2**30, "unknown" if avail is None else f"{avail / 2**30:.1f} GiB",
        )
        if avail is not None and need > 0.8 * avail:
            log.warning("the cache needs %.1f GiB but only %.1f GiB are available", need / 2**30, avail / 2**30)
        self._cache, self._cache_pos[:] = None, -1
        cache = torch.empty((idx.size, 1, *self.shape), dtype=torch.float16)  # (N, 1, D, H, W)
        for pos, i in enumerate(idx):
            cache[pos] = torch.from_numpy(np.asarray(self.read_volume(int(i)), dtype=np.float16))
        self.close()  # no HDF5 handle open in the parent when workers fork
        # fork: workers share these pages copy-on-write (never written); spawn: torch moves the
        # tensor to shared memory (/dev/shm) when the dataset is sent to the workers.
        self._cache = cache
        self._cache_pos[idx] = np.arange(idx.size)

    @property
    def cached_indices(self) -> np.ndarray:
        """Indices currently held in the memory cache (sorted)."""
        return np.flatnonzero(self._cache_pos >= 0)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key`` (or ``(index, transform_seed)``); see the class docstring for the keys."""
        i, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
        vol = self.read_volume(i)
        image = vol.float() if isinstance(vol, torch.Tensor) else torch.from_numpy(np.asarray(vol, dtype=np.float32))
        item: dict[str, Any] = {
            "image": image,  # (1, D, H, W)
            "age": torch.tensor(self.ages[i]),
            "age_bin": torch.tensor(self.age_bins[i]),
            "label": torch.tensor(self.labels[i]),
            "sex": torch.tensor(self.sexes[i]),
            "subject_id": self.subject_ids[i],
        }
        if self.transform is not None:
            if seed is not None and hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=seed)
            item = self.transform(item)
            img = item["image"]
            img = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
            item["image"] = img.float()
        return item

    def __repr__(self) -> str:
        return f"ShardDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, task={self.task!r})"


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised batch tensor: in shared memory inside a DataLoader worker, else pinned or plain."""
    if get_worker_info() is not None:  # what default_collate does: the batch crosses to the main process for free
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=pin)
