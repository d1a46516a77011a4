"""BufferPool / recycle: a buffer is handed out again only after the consumer gave it back."""

from __future__ import annotations

import torch

from brainage_hpc.data.batch_buffers import TRAILER_BYTES, BufferPool, buffer_id, recycle


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
