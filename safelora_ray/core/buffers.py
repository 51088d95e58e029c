"""Writable byte buffers allocated by torch, which releases the GIL while it does.

``bytearray(n)`` zero-fills and faults in every page of its memory holding the GIL: for a 7B
adapter's 8 MB a millisecond or more, for a set's 64 MiB matrix tens of milliseconds, in
which no other thread of the process runs Python (18 % of an I/O worker's GIL-holding samples
went there, docs/benchmarks.md §14.1e; 34 % of an in-process S3 sanitize's, §15.3).
"""

from __future__ import annotations

from typing import Any

import torch


def new_buffer(nbytes: int) -> Any:
    """A new writable uint8 numpy array of ``nbytes`` bytes (buffer protocol, format ``B``),
    not zero-filled: its pages are faulted in by whatever fills it first (a read, which
    releases the GIL), a second pass over them saved. Its bytes are whatever the allocator
    had, so a caller fills all of them or throws it away.

    Its reference count says whether a view of it lives (a ``memoryview`` or a tensor made
    from one holds the array), which :class:`~safelora_ray.execution.buffers.Loans` relies on.
    """
    return torch.empty(nbytes, dtype=torch.uint8).numpy()


__all__ = ["new_buffer"]
