"""An output-sized file (8.4 MB) written N times as a sanitize writes one (buffered, fsync,
then its pages dropped) against O_DIRECT from a page-aligned buffer (fsync too): CPU and
wall milliseconds per file, two rounds. Usage: python odirect_out.py [N] [DIR]
(default 200 files under /tmp/odx/out, removed afterwards)."""

import fcntl
import mmap
import os
import shutil
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ROOT = sys.argv[2] if len(sys.argv) > 2 else "/tmp/odx/out"
SIZE = 8_400_000
BLOCK = 4096
buf = mmap.mmap(-1, (SIZE + BLOCK - 1) // BLOCK * BLOCK)  # page-aligned, as O_DIRECT needs
buf[:SIZE] = os.urandom(SIZE)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _finish(fd: int) -> None:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def buffered(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _write_all(fd, memoryview(buf)[:SIZE])
    _finish(fd)


def direct(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    whole = SIZE // BLOCK * BLOCK
    _write_all(fd, memoryview(buf)[:whole])
    # O_DIRECT writes no partial block: the tail through the page cache.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    _write_all(fd, memoryview(buf)[whole:SIZE])
    _finish(fd)


for _round in range(2):
    for name, write in (("buffered", buffered), ("direct", direct)):
        shutil.rmtree(ROOT, ignore_errors=True)
        os.makedirs(ROOT)
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(N):
            write(f"{ROOT}/f{i}")
        c1, t1 = time.process_time(), time.perf_counter()
        print(f"{name}: CPU {1e3 * (c1 - c0) / N:.2f} ms a file, wall "
              f"{1e3 * (t1 - t0) / N:.2f} ms", flush=True)
shutil.rmtree(ROOT, ignore_errors=True)
