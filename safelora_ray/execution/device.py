"""Copies between a GPU and the host."""

from __future__ import annotations

import torch


def to_host(t: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy of the GPU tensor ``t`` into fresh pinned host memory (the caching
    host allocator reuses pinned blocks: no ``cudaHostAlloc`` per call). Synchronize, or
    record an event, before reading it."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


__all__ = ["to_host"]
