"""Issue 23, seventh session: a 2 GiB file written around the page cache (O_DIRECT, as a
node's copy of a set is), then mapped and its tensor digests taken in 64 MiB pieces by 1, 2
or 4 threads (each argument: a thread count, e.g. ``2 1 2 1 4``); CPU and wall of each.
A file under ``DIR`` (default /tmp). Run from the repository root with ``PYTHONPATH=.``."""

from __future__ import annotations

import concurrent.futures as cf
import mmap
import os
import sys
import time

from safelora_ray.formats.integrity import tensor_digest

N = 2 * 1024**3
W = 64 * 1024**2


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    path = os.path.join(os.environ.get("DIR", "/tmp"), "check-threads.bin")
    buf = mmap.mmap(-1, W)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1024) * (W // 1024))
    try:
        for arg in sys.argv[1:]:
            threads = int(arg)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            for _ in range(0, N, W):
                os.write(fd, buf)
            os.close(fd)
            time.sleep(1)
            c0, w0 = cpu(), time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            os.close(fd)
            view = memoryview(m)
            parts = [view[i:i + W] for i in range(0, N, W)]
            with cf.ThreadPoolExecutor(threads) as pool:
                list(pool.map(tensor_digest, parts))
            for p in parts:
                p.release()
            view.release()
            m.close()
            print(f"{threads} thread(s): CPU {cpu() - c0:.2f} s, wall "
                  f"{time.perf_counter() - w0:.2f} s", flush=True)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
