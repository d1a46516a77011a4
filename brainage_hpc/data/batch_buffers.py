"""Reusable host buffers for loader batches, handed back by the consumer.

A fresh 16 MB batch tensor costs more than reading the volumes into it: the
kernel zeroes and maps every page on first touch, and inside a DataLoader worker
it is a new shared-memory file per batch. Measured on the 2-core CI machine
(fp16 128^3, batch 4, 2 workers, consumer that only counts): 420-470 vol/s with a
fresh shared buffer per batch, 2,500 vol/s with reused ones.

Reuse is only safe once the consumer is done with a batch, and only the consumer
knows when that is; so the pool never guesses. :meth:`BufferPool.take` returns a
buffer marked *busy* in a 32-byte trailer after its payload (a magic, a state
byte, the owner's pid, a serial and the loader iteration it was filled for, in the
same shared memory the worker wrote); :func:`recycle` marks it *free*, from
whichever process holds the batch; the pool hands out only free buffers. A
consumer that never calls :func:`recycle` gets a fresh buffer per batch once
``max_buffers`` are busy: slower, never wrong.

One case needs no consumer: a DataLoader whose iteration is abandoned (``break``,
``next(iter(loader))``, a stop request) drops the batches its workers had already
prefetched; nobody can recycle them, and with persistent workers each abandoned
iteration would shrink the pool for good (measured: 2 workers fell from ~580 to
~300 vol/s after one ``next(iter(loader))``). So each batch's keys carry a
*lease*, (loader token, iteration number), drawn in the main process when the
iteration starts (:class:`brainage_hpc.data.loader._BatchLoader`); the buffer is
stamped with it, and the main process marks each batch it receives *delivered*
(:func:`mark_delivered`). A worker's tasks arrive in the order they were issued,
so when it serves a later iteration of the same loader, a buffer still *busy*
(never received) from an earlier one was dropped: the pool reuses it. A delivered
buffer is never reclaimed: only :func:`recycle` frees it.

Crossing the process boundary costs too: torch sends every shared tensor by
passing its file descriptor over a fresh authenticated socket to the worker's
resource-sharer thread, which waits for the worker's GIL (measured: ~25 ms to the
first batch of an epoch, 410-540 vol/s with 2 workers). A worker batch therefore
travels as a :class:`WireBatch`: the image's buffer is sent once, the main process
keeps its mapping (:class:`MappedBuffers`) and says so in the trailer, and later
batches name the buffer by (pid, serial); the small fields go as numpy arrays,
pickled by value. The trainer's device step
(:class:`~brainage_hpc.data.loader._DeviceLoader`) recycles a batch right after it
has been copied or converted to the device, and only when the device batch no
longer shares the buffer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["TRAILER_BYTES", "BufferPool", "MappedBuffers", "WireBatch", "buffer_id", "mark_delivered", "recycle", "to_wire"]

_MAGIC = b"bahpcbf1"  # 8 bytes: this storage ends in a pool trailer
TRAILER_BYTES = 32  # magic (8), state (1), padding (3), owner pid (u32), serial (u64), loader token (u32), iteration (u32)
_FREE, _BUSY, _UNPOOLED, _DELIVERED = 0, 1, 2, 3
_STATE = 8  # offset of the state byte in the trailer
_MAPPED = 9  # 1 once the main process holds its own mapping of the buffer (MappedBuffers)
_LEASE = slice(24, 32)  # (token, iteration) as two uint32


def _trailer(storage: torch.UntypedStorage) -> np.ndarray:
    """The trailer (last bytes) of ``storage`` as a numpy uint8 view (writes reach shared memory; no tensor calls,
    which the trainer's sync counter would count)."""
    n = storage.nbytes()
    return torch.empty(0, dtype=torch.uint8).set_(storage, n - TRAILER_BYTES, (TRAILER_BYTES,)).numpy()


def _pool_trailer(tensor: torch.Tensor) -> np.ndarray | None:
    """The trailer of the pool buffer behind ``tensor``, ``None`` when its storage is not one."""
    storage = tensor.untyped_storage()
    if storage.nbytes() < TRAILER_BYTES or storage.device.type != "cpu":
        return None
    tail = _trailer(storage)
    return tail if tail[:8].tobytes() == _MAGIC else None


def recycle(tensor: torch.Tensor) -> bool:
    """Hand the pool buffer behind ``tensor`` back: its owner may overwrite it from now on.

    Call it only when nothing reads ``tensor`` (or any view of its storage) any more.

    Returns:
        Whether a busy pool buffer was released (``False`` for any other tensor).
    """
    tail = _pool_trailer(tensor)
    if tail is None or tail[_STATE] not in (_BUSY, _DELIVERED):
        return False
    tail[_STATE] = _FREE
    return True


def mark_delivered(tensor: object) -> None:
    """The consumer has received the batch behind ``tensor``: from now on only :func:`recycle` frees its buffer
    (called by the main process on every batch a pooled loader yields; anything else is ignored)."""
    if not isinstance(tensor, torch.Tensor):
        return
    tail = _pool_trailer(tensor)
    if tail is not None and tail[_STATE] == _BUSY:
        tail[_STATE] = _DELIVERED


def buffer_id(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(owner pid, serial) of the pool buffer behind ``tensor``, ``None`` for any other tensor.

    The same pair for two batches means the second reused the first's memory (tests, debugging).
    """
    tail = _pool_trailer(tensor)
    return None if tail is None else _owner_serial(tail)


def _owner_serial(tail: np.ndarray) -> tuple[int, int]:
    return int(tail[12:16].view(np.uint32)[0]), int(tail[16:24].view(np.uint64)[0])


class BufferPool:
    """Up to ``max_buffers`` host buffers per size, reused once recycled (see the module docstring).

    Buffers live in shared memory inside a DataLoader worker (the batch crosses to
    the main process without a copy), in pinned memory when ``pin`` is set, else in
    plain memory. A pool belongs to the process that created its buffers; after a
    ``fork`` the child starts empty.

    Args:
        max_buffers: buffers kept per size; beyond that, busy ones are not waited for.
    """

    def __init__(self, max_buffers: int = 6) -> None:
        self.max_buffers = max_buffers
        self._pid = os.getpid()
        self._buffers: dict[tuple[int, bool], list[tuple[torch.Tensor, np.ndarray]]] = {}  # (buffer, its trailer)
        self.allocated = 0  # buffers made (pooled or not), for tests and benchmarks

    def __getstate__(self) -> dict[str, object]:
        return {"max_buffers": self.max_buffers, "_pid": None, "_buffers": {}, "allocated": 0}

    def take(self, nbytes: int, pin: bool = False, lease: tuple[int, int] | None = None) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (uninitialised), marked busy until :func:`recycle`.

        Its storage is ``nbytes + TRAILER_BYTES`` long; write only the first ``nbytes``.

        Args:
            lease: (loader token, iteration) this batch is for: a buffer of the same loader from another
                iteration that is still busy (never delivered) is reused. ``None``: no reclaiming.
        """
        if self._pid != os.getpid():
            self._buffers, self._pid = {}, os.getpid()
        shared = get_worker_info() is not None
        key = (nbytes, pin and not shared)
        pool = self._buffers.setdefault(key, [])
        stamp = np.array(lease or (0, 0), dtype=np.uint32).view(np.uint8)
        for full, tail in pool:
            if tail[_STATE] == _FREE or (lease is not None and tail[_STATE] == _BUSY and _abandoned(tail, lease)):
                tail[_STATE] = _BUSY
                tail[_LEASE] = stamp
                return full[:nbytes]
        full = self._allocate(nbytes + TRAILER_BYTES, shared, key[1])
        tail = full[nbytes:].numpy()
        tail[:] = 0  # the memory is uninitialised: no stale state or "mapped" flag
        tail[:8] = np.frombuffer(_MAGIC, dtype=np.uint8)
        tail[12:16] = np.frombuffer(np.uint32(os.getpid() % 2**32).tobytes(), dtype=np.uint8)
        tail[16:24] = np.frombuffer(np.uint64(self.allocated).tobytes(), dtype=np.uint8)
        tail[_LEASE] = stamp
        tail[_STATE] = _BUSY
        if len(pool) < self.max_buffers:
            pool.append((full, tail))
        else:
            tail[_STATE] = _UNPOOLED  # recycle() ignores it; freed when the batch is dropped
        return full[:nbytes]

    def _allocate(self, nbytes: int, shared: bool, pin: bool) -> torch.Tensor:
        self.allocated += 1
        if shared:  # what default_collate does in a worker: sending it to the main process copies nothing
            storage = torch.UntypedStorage._new_shared(nbytes)
            return torch.empty(0, dtype=torch.uint8).set_(storage)
        return torch.empty((nbytes,), dtype=torch.uint8, pin_memory=pin)

    def __len__(self) -> int:
        return sum(len(v) for v in self._buffers.values())


def _abandoned(tail: np.ndarray, lease: tuple[int, int]) -> bool:
    """Whether a busy buffer was filled for an earlier iteration of the loader ``lease`` names (so it was dropped)."""
    token, iteration = (int(v) for v in tail[_LEASE].view(np.uint32))
    return token == lease[0] != 0 and iteration != lease[1]


@dataclass
class WireBatch:
    """A worker's batch on its way to the main process (see the module docstring)."""

    key: tuple[int, int]  # (owner pid, serial) of the image's buffer
    storage: torch.UntypedStorage | None  # the buffer itself, until the main process has mapped it
    shape: tuple[int, ...]
    dtype: torch.dtype
    fields: dict[str, Any]  # everything else: numpy arrays and lists, pickled by value


def to_wire(batch: dict[str, Any]) -> dict[str, Any] | WireBatch:
    """``batch`` as a :class:`WireBatch` when its image lies in a pool buffer; otherwise unchanged (worker side)."""
    image = batch.get("image")
    tail = _pool_trailer(image) if isinstance(image, torch.Tensor) else None
    if tail is None or tail[_STATE] == _UNPOOLED or image.storage_offset() != 0 or not image.is_contiguous():  # type: ignore[union-attr]
        return batch  # an unpooled buffer is never reused: not worth a lasting mapping
    assert isinstance(image, torch.Tensor)
    fields = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "image"}
    storage = None if tail[_MAPPED] else image.untyped_storage()
    return WireBatch(_owner_serial(tail), storage, tuple(image.shape), image.dtype, fields)


class MappedBuffers:
    """The main process's mappings of its workers' pool buffers, so each crosses the process boundary once.

    Keep one per DataLoader and :meth:`clear` it whenever that loader starts new worker processes.
    """

    def __init__(self) -> None:
        self._storages: dict[tuple[int, int], torch.UntypedStorage] = {}

    def __len__(self) -> int:
        return len(self._storages)

    def from_wire(self, wire: WireBatch) -> dict[str, Any]:
        """The batch ``wire`` describes, with tensors as a worker's ``read_batch`` made them."""
        if wire.storage is not None:
            self._storages[wire.key] = wire.storage
            _trailer(wire.storage)[_MAPPED] = 1  # from now on the worker sends only the key
        storage = self._storages.get(wire.key)
        if storage is None:
            raise RuntimeError(f"batch buffer {wire.key} was never received by this process (a stale worker?)")
        nbytes = math.prod(wire.shape) * wire.dtype.itemsize
        image = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,)).view(wire.dtype).view(wire.shape)
        out: dict[str, Any] = {"image": image}
        for k, v in wire.fields.items():
            out[k] = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
        return out

    def clear(self) -> None:
        """Forget every mapping (their workers are gone); a later batch of a live worker would resend its buffer."""
        for storage in self._storages.values():
            _trailer(storage)[_MAPPED] = 0
        self._storages.clear()
