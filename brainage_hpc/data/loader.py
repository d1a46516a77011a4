"""The loader factory the trainer uses: one call per split and rank.

Two paths yield identical batches (same keys and dtypes), already on the device::

    image (B, 1, D, H, W) float32, age (B,) float32 years (NaN when unknown),
    age_bin (B,) int64, label (B,) int64, sex (B,) float32, subject_id list[str]

* DataLoader path: ``num_workers`` processes each read whole batches
  (:meth:`ShardDataset.read_batch`: chunks copied into one fp16 tensor in shared
  memory, checksums verified, no per-item collation). The batch tensors come from
  a :class:`~brainage_hpc.data.batch_buffers.BufferPool` and go back to it once the
  device step is done with them, so a worker refills the same shared memory
  instead of mapping a fresh 16 MB file per batch; CPU augmentation
  (``augment.device == "cpu"``) runs there per item. The batch crosses to the
  main process as float16 (pinned when the device is CUDA), is copied to the
  device and converted to float32 there (:func:`batch_to_device`): half the
  bytes on every hop, and no float32 pass over the volume on the CPU.
* GPU-resident path (``data.cache == "gpu"`` on a CUDA device, when the rank's
  volumes fit with 30 % of the free memory to spare): the rank's volumes are
  loaded once onto the device as fp16 and batches are gathered there; no CPU
  worker is on the hot path.

In both, random augmentation on the device is :attr:`LoaderBundle.device_augment`,
which the trainer applies after moving the batch to the device.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, get_worker_info

from brainage_hpc.config import RunConfig
from brainage_hpc.data.batch_buffers import BufferPool, MappedBuffers, WireBatch, mark_delivered, recycle, to_wire
from brainage_hpc.data.dataset import BrainSampler, ShardDataset
from brainage_hpc.data.transforms import DeviceAugment, train_transforms

__all__ = ["DeviceBatches", "LoaderBundle", "batch_to_device", "build_loader", "seed_worker"]

log = logging.getLogger(__name__)

_MAX_SEED = 2**32
_GPU_HEADROOM = 0.30  # keep 30 % of the free device memory for the model


@dataclass
class LoaderBundle:
    """What the trainer needs for one split on one rank.

    Attributes:
        loader: iterable of batch dicts (see the module docstring).
        sampler: the train sampler (``set_epoch``, ``state_dict``); ``None`` for eval.
        dataset: the underlying :class:`ShardDataset`.
        device_augment: batched augmentation to apply on the device, or ``None``.
        num_batches: batches per full epoch on this rank. Train: equal on every
            rank. Eval: ranks get ``rank::world_size`` exactly once, so counts may
            differ by one batch between ranks (reduce metric *sums*, not means).
        mode: ``"dataloader"`` or ``"gpu-resident"``.
    """

    loader: Iterable[dict[str, Any]]
    sampler: BrainSampler | None
    dataset: ShardDataset
    device_augment: Callable[[dict[str, Any]], dict[str, Any]] | None
    num_batches: int
    mode: str = "dataloader"

    def __len__(self) -> int:
        return self.num_batches


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python, numpy and the MONAI transform from ``torch.initial_seed()``."""
    seed = torch.initial_seed() % _MAX_SEED
    random.seed(seed)
    np.random.seed(seed)
    info = get_worker_info()
    dataset = getattr(info.dataset, "dataset", info.dataset) if info is not None else None  # _Batches wraps it
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)


def _item_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1)[0])


class _SeededSampler:
    """Yields ``(index, transform_seed)``: augmentation depends only on (seed, epoch, rank, position)."""

    def __init__(self, sampler: BrainSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sampler
        start, epoch = s.start_position, s.epoch
        for k, idx in enumerate(s):
            yield idx, _item_seed(s.seed, epoch, s.rank, start + k)

    def __len__(self) -> int:
        return len(self.sampler)


class _Batches(Dataset):
    """A :class:`ShardDataset` as the DataLoader sees it: ``__getitems__`` returns a whole batch.

    With ``collate_fn=_keep_batch`` the DataLoader hands that batch on untouched,
    so no per-item dicts are built and no ``torch.stack`` copies the volumes.
    """

    def __init__(self, dataset: ShardDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        return self.dataset.read_batch([key])

    def __getitems__(self, keys: list[Any]) -> dict[str, Any] | WireBatch:
        batch = self.dataset.read_batch(keys, getattr(keys, "lease", None))
        if get_worker_info() is not None and self.dataset.buffer_pool is not None:
            return to_wire(batch)  # the main process's _BatchLoader turns it back into the same dict
        return batch


class _LeasedKeys(list):  # type: ignore[type-arg]
    """One batch's keys and the (loader token, iteration) they were drawn for (pickled with them to the worker)."""

    lease: tuple[int, int] | None = None


class _LeasedBatches(Sampler[list[Any]]):
    """``BatchSampler`` whose batches carry the lease of the iteration that drew them."""

    def __init__(self, sampler: Iterable[Any], batch_size: int, drop_last: bool) -> None:
        self.batches = BatchSampler(sampler, batch_size, drop_last)  # type: ignore[arg-type]
        self.token = int.from_bytes(os.urandom(4), "little") | 1  # names this loader; never 0
        self.iteration = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Any]]:
        return self._tagged((self.token, self.iteration))  # read now, when the iteration starts, not at the first batch

    def _tagged(self, lease: tuple[int, int]) -> Iterator[list[Any]]:
        for keys in self.batches:
            out = _LeasedKeys(keys)
            out.lease = lease
            yield out


class _BatchLoader(DataLoader):
    """The DataLoader over :class:`_Batches`: numbers its iterations and marks each batch it yields delivered.

    So the workers' buffer pools take back the batches an abandoned iteration
    (``break``, ``next(iter(loader))``) had prefetched; see
    :mod:`brainage_hpc.data.batch_buffers`. What it yields is unchanged.
    """

    def __init__(self, dataset: _Batches, *, batch_size: int, sampler: Iterable[Any], drop_last: bool,
                 **kw: Any) -> None:
        super().__init__(dataset, batch_sampler=_LeasedBatches(sampler, batch_size, drop_last), **kw)
        self._mapped = MappedBuffers()  # the workers' batch buffers, each received once

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        leased = self.batch_sampler
        assert isinstance(leased, _LeasedBatches)
        leased.iteration = (leased.iteration + 1) % 2**32  # before this iteration's first batch is drawn
        if not (self.persistent_workers and self._iterator is not None):  # DataLoader keeps persistent workers' iterator there
            self._mapped.clear()  # new worker processes: new buffers
        for batch in super().__iter__():
            if isinstance(batch, WireBatch):
                batch = self._mapped.from_wire(batch)
            mark_delivered(batch.get("image"))
            yield batch


def _keep_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """``collate_fn`` for :class:`_Batches`: the batch is already assembled."""
    return batch


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to ``device`` (asynchronously from pinned memory) and make ``image`` float32 there.

    Args:
        batch: a loader batch; ``image`` (B, 1, D, H, W) float16 or float32.
        device: target device.

    Returns:
        A new dict; ``image`` is float32 on ``device``, other tensors moved, the rest as is.
    """
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=value.is_pinned())
            if key == "image" and value.dtype != torch.float32:
                value = value.float()  # on the device: fp16 crossed the bus, fp32 is made where it is used
        out[key] = value
    return out


class _DeviceLoader:
    """Iterates a DataLoader and yields its batches on the device (see :func:`batch_to_device`).

    The host batch goes back to its pool (:func:`~brainage_hpc.data.batch_buffers.recycle`) as soon
    as the device batch no longer needs it: at once after a synchronous copy or conversion, after
    the copy's CUDA event for an asynchronous one; never while the device batch shares its memory.
    """

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        in_flight: list[tuple[Any, torch.Tensor]] = []  # (CUDA event, host image) of asynchronous copies
        try:
            for batch in self.loader:
                out = batch_to_device(batch, self.device)
                host, dev = batch.get("image"), out.get("image")
                in_flight = _recycle_done(in_flight)
                if isinstance(host, torch.Tensor) and isinstance(dev, torch.Tensor) and not _shares_memory(host, dev):
                    if host.is_pinned() and dev.is_cuda:
                        event = torch.cuda.Event()
                        event.record()
                        in_flight.append((event, host))
                    else:
                        recycle(host)
                del batch, host, dev
                yield out
        finally:  # also when the consumer stops early: the copies still in flight finish first
            for event, host_image in in_flight:
                event.synchronize()
                recycle(host_image)


def _recycle_done(in_flight: list[tuple[Any, torch.Tensor]]) -> list[tuple[Any, torch.Tensor]]:
    """Recycle the host images whose asynchronous copy has finished; return the others."""
    pending = []
    for event, host in in_flight:
        if event.query():
            recycle(host)
        else:
            pending.append((event, host))
    return pending


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _RawVolumes(Dataset):
    """Stored fp16 volumes of ``indices`` (for filling the device cache)."""

    def __init__(self, dataset: ShardDataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> torch.Tensor:
        vol = self.dataset.read_volume(int(self.indices[k]))
        return vol if isinstance(vol, torch.Tensor) else torch.from_numpy(np.asarray(vol, dtype=np.float16))


class DeviceBatches:
    """Batches gathered from volumes held on the device, in sampler order (GPU-resident mode).

    Args:
        dataset: the split (metadata and subject ids).
        sampler: the rank's :class:`BrainSampler`; only its indices are loaded.
        micro_batch: per-rank batch size B; incomplete tail batches are dropped.
        device: where the volumes live.
        num_workers: processes that read the shards during the one-off load.
        start_method: their multiprocessing start method (``None``: the platform default).
    """

    def __init__(
        self,
        dataset: ShardDataset,
        sampler: BrainSampler,
        micro_batch: int,
        device: torch.device,
        num_workers: int = 0,
        start_method: str | None = None,
    ) -> None:
        self.dataset, self.sampler, self.micro_batch, self.device = dataset, sampler, micro_batch, device
        held = sampler.indices_for_rank()
        self._pos = torch.full((len(dataset),), -1, dtype=torch.long)
        self._pos[torch.from_numpy(held)] = torch.arange(len(held))
        self._pos = self._pos.to(device)
        self.images = torch.empty((len(held), 1, *dataset.shape), dtype=torch.float16, device=device)  # (N, 1, D, H, W)
        ctx: dict[str, Any] = {"multiprocessing_context": start_method} if num_workers > 0 and start_method else {}
        reader = DataLoader(_RawVolumes(dataset, held), batch_size=4, num_workers=num_workers, **ctx)
        t0 = time.perf_counter()
        k = 0
        for vols in reader:  # (b, 1, D, H, W) fp16
            self.images[k : k + len(vols)].copy_(vols, non_blocking=False)
            k += len(vols)
        dataset.close()
        log.info("loaded %d volumes onto %s in %.1f s", k, device, time.perf_counter() - t0)
        self.age = torch.from_numpy(dataset.ages).to(device)
        self.age_bin = torch.from_numpy(dataset.age_bins).to(device)
        self.label = torch.from_numpy(dataset.labels).to(device)
        self.sex = torch.from_numpy(dataset.sexes).to(device)

    def __len__(self) -> int:
        return len(self.sampler) // self.micro_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = list(self.sampler)
        for b in range(len(order) // self.micro_batch):
            idx_list = order[b * self.micro_batch : (b + 1) * self.micro_batch]
            idx = torch.tensor(idx_list, dtype=torch.long).to(self.device, non_blocking=True)
            yield {
                "image": self.images.index_select(0, self._pos[idx]).float(),  # (B, 1, D, H, W)
                "age": self.age[idx],
                "age_bin": self.age_bin[idx],
                "label": self.label[idx],
                "sex": self.sex[idx],
                "subject_id": [self.dataset.subject_ids[i] for i in idx_list],
            }


def _gpu_fits(n_volumes: int, volume_bytes: int, device: torch.device) -> bool:
    need = n_volumes * volume_bytes
    free, total = torch.cuda.mem_get_info(device)
    ok = need <= (1.0 - _GPU_HEADROOM) * free
    log.info(
        "GPU-resident data: %d volumes need %.2f GiB; %s has %.1f of %.1f GiB free (keeping %d %% headroom): %s",
        n_volumes, need / 2**30, device, free / 2**30, total / 2**30, int(_GPU_HEADROOM * 100),
        "fits" if ok else "does not fit",
    )
    return ok


def _dataloader_kwargs(cfg: RunConfig, device: torch.device, rank: int) -> dict[str, Any]:
    d = cfg.data
    kw: dict[str, Any] = {
        "num_workers": d.num_workers,
        "pin_memory": bool(d.pin_memory and device.type == "cuda"),
        "worker_init_fn": seed_worker,
        "collate_fn": _keep_batch,
        # a private generator: creating an iterator must not consume the global torch RNG (exact resume restores it)
        "generator": torch.Generator().manual_seed(cfg.train.seed * 1000 + rank),
    }
    if d.num_workers > 0:
        kw.update(
            persistent_workers=d.persistent_workers,
            prefetch_factor=d.prefetch_factor,
            multiprocessing_context=d.start_method,
        )
    return kw


def build_loader(
    cfg: RunConfig, split: str, *, train: bool, micro_batch: int, rank: int, world_size: int, device: torch.device
) -> LoaderBundle:
    """Build the loader of ``split`` for this rank.

    Args:
        cfg: run config (``data``, ``model.task``, ``train.seed``).
        split: split name in the manifest (``cfg.data.train_split`` / ``val_split``).
        train: shuffle, (balanced) sampling, augmentation and ``drop_last``;
            ``False`` gives each rank ``rank::world_size`` once, in order.
        micro_batch: per-rank batch size B (``batch_size // world_size // grad_accum``).
        rank: this rank, in [0, world_size).
        world_size: number of ranks.
        device: the rank's device; CUDA enables pinned memory and GPU-resident mode.

    Returns:
        A :class:`LoaderBundle`.
    """
    d = cfg.data
    if not d.shards:
        raise ValueError("data.shards is empty: set it to the folder written by `brainage preprocess`")
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    device = torch.device(device)
    aug = d.augment
    use_aug = train and aug.enabled
    dataset = ShardDataset(d.shards, split, task=cfg.model.task)
    # no workers: read_batch fills pinned memory itself (the DataLoader's pin step is then a no-op)
    dataset.pin_batches = bool(d.pin_memory and device.type == "cuda" and d.num_workers == 0)
    # reused batch buffers: handed back by _DeviceLoader after the device step; not when the
    # DataLoader's pin thread copies worker batches (their buffers would never come back)
    if not (d.pin_memory and device.type == "cuda" and d.num_workers > 0):
        dataset.buffer_pool = BufferPool(max_buffers=(d.prefetch_factor or 2) + 3)
    if list(dataset.shape) != list(d.shape):
        log.info("data.shape=%s but the shards hold %s; using the shards' shape", list(d.shape), list(dataset.shape))
    seed = cfg.train.seed

    if not train:
        dataset.transform = None  # read_batch: the stored values, float16 until the device
        indices = list(range(rank, len(dataset), world_size))
        if d.cache in ("memory", "gpu"):  # eval never goes GPU-resident: it is read once per evaluation
            dataset.cache_volumes(indices)
        loader = _BatchLoader(_Batches(dataset), batch_size=micro_batch, sampler=indices, drop_last=False,
                            **_dataloader_kwargs(cfg, device, rank))
        return LoaderBundle(_DeviceLoader(loader, device), None, dataset, None, math.ceil(len(indices) / micro_batch))

    sampler = BrainSampler(
        len(dataset), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
        balanced=d.balanced, labels=dataset.labels,
    )
    if sampler.num_samples < micro_batch:
        raise ValueError(
            f"split '{split}' gives {sampler.num_samples} samples per rank ({len(dataset)} over {world_size} ranks), "
            f"fewer than micro_batch={micro_batch}: lower data.batch_size or use fewer ranks"
        )
    n_batches = sampler.num_samples // micro_batch
    held = sampler.indices_for_rank()
    if d.cache == "gpu":
        if device.type != "cuda":
            log.warning("data.cache=gpu but the device is %s: using the DataLoader path", device)
        elif _gpu_fits(len(held), dataset.volume_bytes, device):
            batches = DeviceBatches(dataset, sampler, micro_batch, device, d.num_workers, d.start_method)
            dev_aug = DeviceAugment(aug, seed=_item_seed(seed, 0, rank, 2**31)) if use_aug else None
            return LoaderBundle(batches, sampler, dataset, dev_aug, n_batches, mode="gpu-resident")
        else:
            log.warning("data.cache=gpu: the rank's volumes do not fit on %s; using the DataLoader path", device)
    if d.cache == "memory":
        dataset.cache_volumes(held)
    cpu_aug = use_aug and aug.device == "cpu"
    dataset.transform = train_transforms(aug, seed=_item_seed(seed, 0, rank, 2**31 + 1)) if cpu_aug else None
    dev_aug = DeviceAugment(aug, seed=_item_seed(seed, 0, rank, 2**31)) if use_aug and aug.device == "gpu" else None
    loader = _BatchLoader(
        _Batches(dataset), batch_size=micro_batch, sampler=_SeededSampler(sampler), drop_last=True,
        **_dataloader_kwargs(cfg, device, rank),
    )
    return LoaderBundle(_DeviceLoader(loader, device), sampler, dataset, dev_aug, n_batches)
