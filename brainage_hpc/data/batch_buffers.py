"""Reusable host buffers for loader batches, handed back by the consumer.

A fresh 16 MB batch tensor costs more than reading the volumes into it: the
kernel zeroes and maps every page on first touch, and inside a DataLoader worker
it is a new shared-memory file per batch. Measured on the 2-core CI machine
(fp16 128^3, batch 4, 2 workers, consumer that only counts): 420-470 vol/s with a
fresh shared buffer per batch, 2,500 vol/s with reused ones.

Reuse is only safe once the consumer is done with a batch, and only the consumer
knows when that is; so the pool never guesses. :meth:`BufferPool.take` returns a
buffer marked *busy* in a 24-byte trailer after its payload (a magic, a state
byte, the owner's pid and a serial, in the same shared memory the worker wrote); :func:`recycle` marks it
*free*, from whichever process holds the batch; the pool hands out only free
buffers. A consumer that never calls :func:`recycle` gets a fresh buffer per batch
once ``max_buffers`` are busy: slower, never wrong. The trainer's device step
(:class:`~brainage_hpc.data.loader._DeviceLoader`) recycles a batch right after it
has been copied or converted to the device, and only when the device batch no
longer shares the buffer.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["TRAILER_BYTES", "BufferPool", "buffer_id", "recycle"]

_MAGIC = b"bahpcbf1"  # 8 bytes: this storage ends in a pool trailer
TRAILER_BYTES = 24  # magic (8), state (1), padding (3), owner pid (uint32), serial (uint64)
_FREE, _BUSY, _UNPOOLED = 0, 1, 2
_STATE = 8  # offset of the state byte in the trailer


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
    if tail is None or tail[_STATE] != _BUSY:
        return False
    tail[_STATE] = _FREE
    return True


def buffer_id(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(owner pid, serial) of the pool buffer behind ``tensor``, ``None`` for any other tensor.

    The same pair for two batches means the second reused the first's memory (tests, debugging).
    """
    tail = _pool_trailer(tensor)
    if tail is None:
        return None
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

    def take(self, nbytes: int, pin: bool = False) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (uninitialised), marked busy until :func:`recycle`.

        Its storage is ``nbytes + TRAILER_BYTES`` long; write only the first ``nbytes``.
        """
        if self._pid != os.getpid():
            self._buffers, self._pid = {}, os.getpid()
        shared = get_worker_info() is not None
        key = (nbytes, pin and not shared)
        pool = self._buffers.setdefault(key, [])
        for full, tail in pool:
            if tail[_STATE] == _FREE:
                tail[_STATE] = _BUSY
                return full[:nbytes]
        full = self._allocate(nbytes + TRAILER_BYTES, shared, key[1])
        tail = full[nbytes:].numpy()
        tail[:8] = np.frombuffer(_MAGIC, dtype=np.uint8)
        tail[12:16] = np.frombuffer(np.uint32(os.getpid() % 2**32).tobytes(), dtype=np.uint8)
        tail[16:24] = np.frombuffer(np.uint64(self.allocated).tobytes(), dtype=np.uint8)
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
