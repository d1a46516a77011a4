"""Lazy HDF5 dataset over the shards and the distributed (balanced) sampler.

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

:class:`BrainSampler` hands each rank the same number of indices per epoch,
from disjoint per-rank partitions (unbalanced mode) or from per-rank streams
drawn with weights 1/class-count (balanced mode, as the seed's
ImbalancedDatasetSampler), and can resume in the middle of an epoch.
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
from torch.utils.data import Dataset, Sampler, get_worker_info

from brainage_hpc.data.ages import bin_to_class
from brainage_hpc.data.checksum import CHECKSUM_BYTES
from brainage_hpc.data.shard_checks import check_shards, warn_if_unchecked
from brainage_hpc.data.shards import Manifest, ShardReader, load_manifest

__all__ = ["TASKS", "BrainSampler", "ShardDataset"]

log = logging.getLogger(__name__)

TASKS = ("regress", "classify4", "classify2")
_PARTITION_KEY = 0x9A27  # separates the partition stream from the per-epoch streams


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

    def _read_into(self, i: int, out: np.ndarray, padded: bool = False) -> None:
        """Volume ``i`` into ``out``: float16 (1, D, H, W), or with ``padded`` uint8 of its bytes + 4 (see ShardReader)."""
        pos = self._cache_pos[i]
        if self._cache is not None and pos >= 0:
            dest = out.reshape(-1).view(np.uint8)[: self.volume_bytes].view(np.float16) if padded else out.reshape(-1)
            np.copyto(dest, self._cache[pos].numpy().reshape(-1))
        else:
            self._get_reader().read_into(int(self._shard[i]), int(self._index[i]), out, padded=padded)

    def read_batch(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, Any]:
        """Items ``keys`` (indices, or ``(index, transform_seed)``) as one batch.

        The volumes are copied from their chunks (checksums verified) straight into
        one (B, 1, D, H, W) tensor: shared memory inside a DataLoader worker (so
        sending it to the main process copies nothing), pinned memory when
        :attr:`pin_batches` is set, plain memory otherwise. Without a transform the
        image stays float16, as stored; convert it on the device (see
        :func:`brainage_hpc.data.loader.batch_to_device`).

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
            raw = _batch_tensor((len(pairs) * vb + CHECKSUM_BYTES,), torch.uint8, self.pin_batches)
            image = raw[: len(pairs) * vb].view(torch.float16).view(shape)  # (B, 1, D, H, W)
            flat = raw.numpy()
            for j, i in enumerate(idx):
                self._read_into(int(i), flat[j * vb : (j + 1) * vb + CHECKSUM_BYTES], padded=True)
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


class BrainSampler(Sampler[int]):
    """Distributed sampler with optional class balancing and mid-epoch resume.

    Every rank yields ``num_samples`` indices per epoch: ``ceil(n / R)``
    (``n // R`` with ``drop_last``), so DDP ranks run the same number of steps.

    * Unbalanced: the split is cut once (seeded by ``seed``, stratified by
      ``labels`` when given) into ``R`` disjoint partitions; each epoch a rank
      shuffles its own partition (seed, epoch, rank) and, when it is one short,
      pads by wrap-around *within its partition*, so no index is ever on two
      ranks. A rank's partition is fixed, so a per-rank cache (memory or GPU)
      holds only that partition.
    * Balanced: each rank draws ``num_samples`` indices of the whole split with
      replacement, weights 1/class-count, from a generator seeded by
      (seed, epoch, rank).

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``).

    Args:
        n: size of the split.
        num_replicas: number of ranks R.
        rank: this rank, in [0, R).
        shuffle: shuffle each epoch (unbalanced mode); ``False`` keeps index order.
        seed: seed shared by all ranks.
        balanced: class-balanced sampling with replacement (needs ``labels``).
        labels: (n,) class per item; stratifies the partitions, required when balanced.
        drop_last: drop the tail instead of padding (every rank gets ``n // R``).
    """

    def __init__(
        self,
        n: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        balanced: bool = False,
        labels: Sequence[int] | np.ndarray | None = None,
        drop_last: bool = False,
    ) -> None:
        if n < 1:
            raise ValueError(f"BrainSampler needs a non-empty split, got n={n}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must lie in [0, num_replicas={num_replicas})")
        if n < num_replicas and not balanced:
            raise ValueError(f"a split of n={n} items cannot be partitioned over num_replicas={num_replicas} ranks")
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.balanced, self.drop_last = bool(shuffle), int(seed), bool(balanced), bool(drop_last)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and self.labels.shape != (self.n,):
            raise ValueError(f"labels must have shape ({self.n},), got {self.labels.shape}")
        if balanced and self.labels is None:
            raise ValueError("balanced=True needs labels (the class of every item)")
        self.num_samples = self.n // self.num_replicas if drop_last else math.ceil(self.n / self.num_replicas)
        self.epoch = 0
        self._start = 0  # position in the epoch where the next iteration starts (after a resume)
        self._partition = self._make_partition()
        self._probs: np.ndarray | None = None
        if balanced:
            assert self.labels is not None
            counts = np.bincount(self.labels)
            w = 1.0 / counts[self.labels]
            self._probs = w / w.sum()

    def _make_partition(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rank, self.n, self.num_replicas)
        order = np.random.default_rng([self.seed, _PARTITION_KEY]).permutation(self.n)
        if self.labels is not None:
            order = order[np.argsort(self.labels[order], kind="stable")]  # stratified: classes dealt round-robin
        return np.sort(order[self.rank :: self.num_replicas])

    def indices_for_rank(self) -> np.ndarray:
        """Sorted indices this rank can ever yield (what a per-rank cache must hold)."""
        return np.arange(self.n) if self.balanced else self._partition.copy()

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The full order of ``epoch`` (default: the current one) on this rank, (num_samples,)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        if self.balanced:
            return rng.choice(self.n, size=self.num_samples, replace=True, p=self._probs)
        part = rng.permutation(self._partition) if self.shuffle else self._partition
        return np.resize(part, self.num_samples)  # wrap-around pad (or truncate with drop_last)

    @property
    def start_position(self) -> int:
        """Position in the current epoch where iteration starts (non-zero only after a resume)."""
        return self._start

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts from its beginning."""
        if int(epoch) != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self._start :].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self, samples_consumed: int) -> dict[str, Any]:
        """Position in the epoch, for an exact resume.

        Args:
            samples_consumed: samples of the current epoch the trainer has
                *used*, counted from the start of the epoch, including those
                before a resume (``batches_done_in_epoch * micro_batch``). The
                DataLoader prefetches ahead, so the sampler cannot count itself.

        Returns:
            A rank-independent dict: rank 0's state restores every rank.
        """
        if samples_consumed < 0:
            raise ValueError(f"samples_consumed={samples_consumed} must be >= 0")
        if samples_consumed < self._start:
            log.warning(
                "samples_consumed=%d is before the resume point %d of this epoch: it must count from the start "
                "of the epoch, not from the resumed iterator (samples would be repeated)",
                samples_consumed, self._start,
            )
        return {
            "epoch": self.epoch,
            "position": min(int(samples_consumed), self.num_samples),
            "n": self.n,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "balanced": self.balanced,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch at the saved position; later epochs are full.

        A different world size is accepted with a warning: the position is
        rescaled to the same fraction of the epoch, but the order differs.
        """
        for key in ("n", "seed", "balanced", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={getattr(self, key)!r}; "
                    "the data or config changed since the checkpoint (start a fresh run or restore the config)"
                )
        position = int(state["position"])
        if int(state["num_replicas"]) != self.num_replicas:
            old = int(state["num_replicas"])
            position = position * old // self.num_replicas
            log.warning(
                "resuming with %d ranks from a checkpoint of %d ranks: the epoch continues at the same fraction "
                "(position %d), not with the exact same samples",
                self.num_replicas, old, position,
            )
        self.epoch = int(state["epoch"])
        self._start = min(max(position, 0), self.num_samples)

    def __repr__(self) -> str:
        return (
            f"BrainSampler(n={self.n}, rank={self.rank}/{self.num_replicas}, num_samples={self.num_samples}, "
            f"shuffle={self.shuffle}, balanced={self.balanced}, seed={self.seed}, epoch={self.epoch})"
        )
