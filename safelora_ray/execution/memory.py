"""A worker process keeps the memory it frees for its next batch (glibc's malloc).

glibc returns a freed block of more than 128 KiB-32 MiB to the kernel at once (``munmap``, or
a heap trimmed past 128 KiB), so the next batch's buffers of the same sizes are fresh memory
again, which costs a page fault per 4 KiB: on a VM that is more than copying the bytes
(docs/benchmarks.md, section 14). A worker's memory comes back in the same sizes batch after
batch, so it keeps up to ``SAFELORA_MALLOC_KEEP_MB`` freed (0: glibc's defaults), in at
most two arenas (``MALLOC_ARENA_MAX`` unless set): each I/O thread's own arena would drop its
heaps as they empty, and fault them in again for the next adapter (measured in process, 8 I/O
threads, 7B adapters: 1,271 page faults an adapter with glibc's arenas, 3 with two).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from safelora_ray.core.validate import env_number

logger = logging.getLogger(__name__)

#: MiB of freed memory a worker process keeps rather than return to the kernel.
KEEP_MB = env_number("SAFELORA_MALLOC_KEEP_MB", 1024, int)

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Blocks up to this size come from the heap, where freed memory is kept (glibc's maximum).
_MMAP_THRESHOLD = 32 * 1024**2


def keep_freed_memory(keep_mb: int = KEEP_MB) -> bool:
    """Make this process's malloc keep up to ``keep_mb`` MiB it freed, serve blocks up to
    32 MiB from its heaps, in at most two arenas; whether it took effect (glibc only;
    elsewhere a no-op). Call it before the process starts its threads."""
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
    if "MALLOC_ARENA_MAX" not in os.environ:  # the operator's setting wins
        ok = bool(mallopt(_M_ARENA_MAX, 2)) and ok
    logger.debug("malloc keeps up to %d MiB freed: %s", keep_mb, ok)
    return ok


__all__ = ["KEEP_MB", "keep_freed_memory"]
