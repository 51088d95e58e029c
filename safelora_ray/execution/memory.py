"""A worker process keeps the memory it frees for its next batch (glibc's malloc).

glibc returns a freed block of more than 128 KiB-32 MiB to the kernel at once (``munmap``, or
a heap trimmed past 128 KiB), so the next batch's buffers of the same sizes are fresh memory
again, which costs a page fault per 4 KiB: on a VM that is more than copying the bytes
(docs/benchmarks.md, section 14). A worker's memory comes back in the same sizes batch after
batch, so it keeps up to ``SAFELORA_MALLOC_KEEP_MB`` freed (0: glibc's defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from safelora_ray.core.validate import env_number

logger = logging.getLogger(__name__)

#: MiB of freed memory a worker process keeps rather than return to the kernel.
KEEP_MB = env_number("SAFELORA_MALLOC_KEEP_MB", 1024, int)

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, where freed memory is kept (glibc's maximum).
_MMAP_THRESHOLD = 32 * 1024**2


def keep_freed_memory(keep_mb: int = KEEP_MB) -> bool:
    """Make this process's malloc keep up to ``keep_mb`` MiB it freed, and serve blocks up to
    32 MiB from its heaps; whether it took effect (glibc only; elsewhere a no-op)."""
    if keep_mb <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, min(keep_mb, 2047) * 1024**2))
    logger.debug("malloc keeps up to %d MiB freed: %s", keep_mb, ok)
    return ok


__all__ = ["KEEP_MB", "keep_freed_memory"]
