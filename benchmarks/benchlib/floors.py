"""The plain-I/O floors a run is compared with: reading and writing the same bytes with
sequential I/O, fsynced; and dropping files from the page cache for cold reads.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchlib.runs import gbps
from safelora_ray.formats.synthetic import MiB, filler_bytes


def evict_page_cache(paths: Iterable[str | Path]) -> int:
    """Ask the kernel to drop the cached pages of these files (``POSIX_FADV_DONTNEED``, no root
    needed; clean pages only, so files are fsynced first). Returns the number of files."""
    n = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def checkpoint_files(*dirs: str | Path) -> list[Path]:
    return [f for d in dirs for f in sorted(Path(d).glob("*.safetensors"))]


def io_floor(src: str | Path, scratch: str | Path, drop_cache: bool = False) -> dict[str, Any]:
    """The plain sequential I/O a sanitize of the catalog under ``src`` cannot avoid: read
    every file of every adapter, and write the same bytes to as many files under ``scratch``
    (one directory per adapter, as the outputs), each fsynced before the next. One thread,
    one file at a time; the two are timed apart (read a file, then write it). With
    ``drop_cache`` each written file leaves the page cache once fsynced (as a sanitize's
    outputs do), so the writes reuse pages instead of faulting in fresh ones.

    Returns:
        ``{"files", "bytes", "read_s", "write_fsync_s", "s", "cpu_s"}`` (``s`` = read +
        write; ``cpu_s``: this process's user + system CPU for it, the kernel's work of the
        syscalls included: what the plain I/O itself costs a host's cores).
    """
    src, scratch = Path(src), Path(scratch)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    buf = bytearray(max((p.stat().st_size for p in files), default=0))
    view = memoryview(buf)
    read_s = write_s = 0.0
    total = 0
    made: set[Path] = set()
    cpu0 = _cpu_s()
    for p in files:
        t0 = time.perf_counter()
        with open(p, "rb", buffering=0) as f:
            n = 0
            while True:
                k = f.readinto(view[n:])
                if not k:
                    break
                n += k
        t1 = time.perf_counter()
        dest = scratch / p.relative_to(src)
        if dest.parent not in made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            made.add(dest.parent)
        with open(dest, "wb", buffering=0) as f:
            w = 0
            while w < n:
                w += f.write(view[w:n])
            os.fsync(f.fileno())
            if drop_cache:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t2 = time.perf_counter()
        read_s += t1 - t0
        write_s += t2 - t1
        total += n
    cpu_s = _cpu_s() - cpu0
    shutil.rmtree(scratch, ignore_errors=True)
    return {"files": len(files), "bytes": total, "read_s": round(read_s, 4),
            "write_fsync_s": round(write_s, 4), "s": round(read_s + write_s, 4),
            "cpu_s": round(cpu_s, 3), "drop_cache": drop_cache}


def _cpu_s() -> float:
    """This thread's CPU seconds (user + system; the floor runs on one thread)."""
    return time.thread_time()


def write_floor(nbytes: Sequence[int], scratch: str | Path) -> dict[str, Any]:
    """Time to write and fsync files of these sizes under ``scratch`` with plain sequential
    I/O (one thread, 64 MiB writes of non-zero bytes, each file fsynced): the least a build
    that writes a set of such files needs. The files are removed afterwards."""
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    block = memoryview((filler_bytes() * 4)[: 64 * MiB])
    t0 = time.perf_counter()
    for i, n in enumerate(nbytes):
        with open(scratch / f"part-{i:05d}", "wb", buffering=0) as f:
            left = n
            while left:
                left -= f.write(block[: min(left, len(block))])
            os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    return {"files": len(nbytes), "bytes": int(sum(nbytes)), "s": round(dt, 4),
            "gbps": gbps(sum(nbytes), dt)}
