"""Read buffers lent for a batch and taken back (execution/buffers.py), and the worker's
malloc setting (execution/memory.py)."""

from __future__ import annotations

import torch

from safelora_ray.core.buffers import new_buffer
from safelora_ray.execution.buffers import BufferPool, Loans
from safelora_ray.execution.memory import keep_freed_memory


def test_a_buffer_comes_back_only_when_no_view_of_it_is_alive() -> None:
    pool = BufferPool(max_free=64 << 20)
    loans = Loans(pool, min_bytes=1 << 20, granule=1 << 20)
    a = loans((1 << 20) + 5)  # rounded up to the granule
    b = loans(3 << 20)
    assert len(a) == 2 << 20 and len(b) == 3 << 20
    view = torch.frombuffer(memoryview(b)[:100], dtype=torch.uint8)  # as read_adapter does
    del a, b
    assert loans.give_back() == 1  # b is still read through `view`
    again = Loans(pool, min_bytes=1 << 20, granule=1 << 20)
    assert len(again((2 << 20) - 3)) == 2 << 20  # a, reused
    other = again(3 << 20)  # b was not given back: a new buffer
    before = int(view[0])
    other[0] = (before + 1) % 256
    assert int(view[0]) == before
    del view


def test_a_fresh_buffer_is_writable_memory_the_readers_take() -> None:
    buf = BufferPool(max_free=0).get(5 << 20)
    view = memoryview(buf)[:4 << 20]
    assert not view.readonly and view.format == "B" and view.nbytes == 4 << 20
    view[:3] = b"abc"
    t = torch.frombuffer(view, dtype=torch.uint8)
    assert bytes(t[:3].tolist()) == b"abc"
    assert len(buf) == 5 << 20


def test_new_buffer_is_writable_uint8_memory() -> None:
    z = new_buffer(3 << 20)
    view = memoryview(z)
    assert len(z) == 3 << 20 and not view.readonly and view.format == "B"
    view[-3:] = b"xyz"
    assert bytes(z[-3:]) == b"xyz"
    assert new_buffer(0).nbytes == 0


def test_small_reads_are_not_pooled_and_the_pool_is_bounded() -> None:
    pool = BufferPool(max_free=3 << 20)
    loans = Loans(pool, min_bytes=1 << 20)
    small = loans(1000)
    assert len(small) == 1000
    for _ in range(4):
        loans(1 << 20)
    assert loans.give_back() == 4  # all unreferenced; the pool keeps what fits
    assert pool._free_bytes == 3 << 20


def test_keep_freed_memory() -> None:
    assert keep_freed_memory(0) is False
    assert keep_freed_memory(64) in (True, False)  # False off glibc; never raises
