"""BufferPool / recycle: a buffer is handed out again only after the consumer gave it back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainage_hpc.data.batch_buffers import (
    TRAILER_BYTES,
    BufferPool,
    MappedBuffers,
    WireBatch,
    buffer_id,
    mark_delivered,
    recycle,
    to_wire,
)


def test_a_buffer_is_reused_only_after_recycle() -> None:
    pool = BufferPool(max_buffers=2)
    a = pool.take(1000)
    b = pool.take(1000)
    assert a.data_ptr() != b.data_ptr() and a.numel() == 1000
    assert a.untyped_storage().nbytes() == 1000 + TRAILER_BYTES
    assert recycle(a[10:20].view(torch.int16))  # any view of the buffer hands it back
    assert not recycle(a)  # already free: nothing to do
    c = pool.take(1000)
    assert c.data_ptr() == a.data_ptr() and pool.allocated == 2
    assert buffer_id(c) == buffer_id(a) != buffer_id(b) and buffer_id(torch.zeros(100)) is None


def test_busy_buffers_are_never_handed_out_and_the_pool_is_bounded() -> None:
    pool = BufferPool(max_buffers=2)
    held = [pool.take(64) for _ in range(5)]
    assert len({t.data_ptr() for t in held}) == 5  # nothing recycled: five distinct buffers
    assert len(pool) == 2 and pool.allocated == 5
    assert not recycle(held[4])  # beyond the pool: left to the garbage collector
    assert recycle(held[1])
    assert pool.take(64).data_ptr() == held[1].data_ptr()


def test_sizes_are_pooled_apart_and_foreign_tensors_are_ignored() -> None:
    pool = BufferPool()
    a = pool.take(100)
    recycle(a)
    assert pool.take(200).data_ptr() != a.data_ptr()
    plain = torch.zeros(100, dtype=torch.uint8)
    assert not recycle(plain) and not recycle(torch.zeros(3)) and int(plain.sum()) == 0


def test_an_abandoned_iterations_undelivered_buffers_are_reclaimed_delivered_ones_never() -> None:
    """What a worker does after ``next(iter(loader))``: the batches it prefetched were dropped unseen."""
    pool = BufferPool(max_buffers=3)
    first, other = (7, 1), (9, 1)  # (loader token, iteration)
    delivered, dropped, foreign = pool.take(64, lease=first), pool.take(64, lease=first), pool.take(64)
    mark_delivered(delivered)
    mark_delivered(torch.zeros(3))  # not a pool buffer: ignored
    assert pool.take(64, lease=first).data_ptr() not in {t.data_ptr() for t in (delivered, dropped, foreign)}
    assert pool.take(64, lease=other).data_ptr() not in {delivered.data_ptr(), dropped.data_ptr()}
    second = (7, 2)  # the loader's next iteration: only its busy buffer of the earlier one comes back
    again = pool.take(64, lease=second)
    assert again.data_ptr() == dropped.data_ptr() and buffer_id(again) == buffer_id(dropped)
    assert pool.take(64, lease=second).data_ptr() not in {delivered.data_ptr(), foreign.data_ptr()}
    assert recycle(delivered)  # a delivered buffer comes back only through recycle
    assert pool.take(64, lease=second).data_ptr() == delivered.data_ptr()


def test_a_pooled_batch_crosses_once_then_by_name() -> None:
    """to_wire (worker) / MappedBuffers (main): the buffer travels until the main process has mapped it."""
    pool = BufferPool(max_buffers=1)

    def batch() -> dict:
        image = pool.take(2 * 3 * 2).view(torch.float16).view(2, 1, 3)
        image.copy_(torch.arange(6, dtype=torch.float16).view(2, 1, 3))
        return {"image": image, "age": torch.tensor([20.0, 30.0]), "subject_id": ["a", "b"]}

    mapped = MappedBuffers()
    first = batch()
    wire = to_wire(first)
    assert isinstance(wire, WireBatch) and wire.storage is not None and isinstance(wire.fields["age"], np.ndarray)
    got = mapped.from_wire(wire)
    assert torch.equal(got["image"], first["image"]) and got["image"].dtype == torch.float16
    assert torch.equal(got["age"], first["age"]) and got["subject_id"] == ["a", "b"]
    assert recycle(got["image"])
    again = to_wire(batch())  # the same buffer: by name only
    assert isinstance(again, WireBatch) and again.storage is None and again.key == wire.key
    second = mapped.from_wire(again)
    assert torch.equal(second["image"], first["image"]) and len(mapped) == 1
    assert isinstance(to_wire(batch()), dict)  # the pool's one buffer is busy: an unpooled one goes as it is
    assert recycle(second["image"])
    mapped.clear()  # its workers are gone: a live one would send the buffer again
    resent = to_wire(batch())
    assert isinstance(resent, WireBatch) and resent.storage is not None and len(mapped) == 0
    with pytest.raises(RuntimeError, match="never received"):
        MappedBuffers().from_wire(WireBatch((1, 2), None, (1,), torch.float16, {}))


def test_a_new_buffer_starts_with_a_clean_trailer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh memory may hold anything (torch.empty): a stale 'mapped' byte would stop the worker from ever
    sending the buffer, and the main process could not rebuild the batch."""
    monkeypatch.setattr(BufferPool, "_allocate", lambda self, n, shared, pin: torch.full((n,), 0xFF, dtype=torch.uint8))
    pool = BufferPool(max_buffers=2)
    image = pool.take(12).view(torch.float16).view(2, 1, 3)
    wire = to_wire({"image": image, "age": torch.zeros(2)})
    assert isinstance(wire, WireBatch) and wire.storage is not None
    assert recycle(image) and pool.take(12).data_ptr() == image.data_ptr()
