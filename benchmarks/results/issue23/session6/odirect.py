"""Issue 23, sixth session: 2 GiB written into fresh page-cache pages against O_DIRECT, then
the file mapped and every page touched; CPU and wall of each, buffered and direct alternating
(a file under ``DIR``, default /tmp)."""

from __future__ import annotations

import mmap
import os
import time

N = 2 * 1024**3
W = 64 * 1024**2


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def run(path: str, buf: mmap.mmap, direct: bool) -> None:
    c0, w0 = cpu(), time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    for _ in range(0, N, W):
        os.write(fd, buf)
    os.close(fd)
    c1, w1 = cpu(), time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    os.close(fd)
    touched = sum(m[off] for off in range(0, N, 4096))
    m.close()
    c2, w2 = cpu(), time.perf_counter()
    print(f"{'direct' if direct else 'buffered'}: write cpu {c1 - c0:.2f} s wall "
          f"{w1 - w0:.2f} s; map+touch cpu {c2 - c1:.2f} s wall {w2 - w1:.2f} s ({touched})",
          flush=True)
    os.unlink(path)


def main() -> None:
    buf = mmap.mmap(-1, W)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1024) * (W // 1024))
    path = os.path.join(os.environ.get("DIR", "/tmp"), "odirect.bin")
    for direct in (False, True, False, True):
        run(path, buf, direct)


if __name__ == "__main__":
    main()
