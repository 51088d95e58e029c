"""Read buffers kept for reuse (one pool per reader: a build's shard, a fine-tune's file)."""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

from safelora_ray.core.buffers import new_buffer


class BufferPool:
    """Read buffers kept for reuse, by size. A buffer read into once stays mapped: reading
    into fresh memory costs a page fault per 4 KiB, more than the read itself (1.4 GB/s into
    fresh buffers, 5.9 GB/s into reused ones, here). Bounded: at most ``max_free`` bytes wait
    for reuse.

    Args:
        max_free: Bytes of free buffers kept.
        pinned: Hand out page-locked uint8 tensors (for a GPU: its copies from them run
            asynchronously, and pinning is paid once per buffer) instead of
            :func:`~safelora_ray.core.buffers.new_buffer`'s arrays.
    """

    def __init__(self, max_free: int, pinned: bool = False) -> None:
        self.max_free = max_free
        self.pinned = pinned
        self._free: dict[int, list[Any]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()

    def get(self, size: int) -> Any:
        with self._lock:
            bufs = self._free.get(size)
            if bufs:
                self._free_bytes -= size
                return bufs.pop()
        if self.pinned:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return new_buffer(size)

    def put(self, buf: Any) -> None:
        size = buf.numel() if isinstance(buf, torch.Tensor) else len(buf)
        with self._lock:
            if self._free_bytes + size <= self.max_free:
                self._free.setdefault(size, []).append(buf)
                self._free_bytes += size


class Loans:
    """The buffers of one pool lent to one piece of work (a batch's reads), taken back
    together when it is done: a callable ``size -> buffer`` for a reader.

    A buffer goes back to the pool only if nothing references it any more: a tensor view of
    it still alive (an adapter kept by a caller) keeps it out, and it is freed with the view.
    So a reused buffer is never one whose bytes someone still reads.

    Args:
        pool: Where the buffers come from and go back to.
        min_bytes: Smaller reads get a fresh bytearray (malloc reuses small blocks itself).
        granule: Sizes are rounded up to a multiple of this, so that files of nearly the same
            size (another header) share buffers; the reader uses the first ``size`` bytes.
    """

    def __init__(self, pool: BufferPool, min_bytes: int = 1 << 20,
                 granule: int = 1 << 20) -> None:
        self.pool = pool
        self.min_bytes = min_bytes
        self.granule = granule
        self._lent: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, size: int) -> Any:
        if size < self.min_bytes:
            return bytearray(size)
        buf = self.pool.get(-(-size // self.granule) * self.granule)
        with self._lock:
            self._lent.append(buf)
        return buf

    def give_back(self) -> int:
        """Return the unreferenced buffers to the pool; how many went back."""
        back = 0
        with self._lock:
            lent, self._lent = self._lent, []
        while lent:
            buf = lent.pop()
            # This name and getrefcount's argument: any other reference is a live view.
            if sys.getrefcount(buf) <= 2:
                self.pool.put(buf)
                back += 1
            del buf
        return back


__all__ = ["BufferPool", "Loans"]
