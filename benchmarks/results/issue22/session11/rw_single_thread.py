"""One thread's CPU per adapter of read_adapter + adapter_grams + write_adapter over the
proxy's 7B pool (``/tmp/p22/pool``, as kept by ``bench_fleet.py --workdir /tmp/p22 --keep``).

    OMP_NUM_THREADS=1 PYTHONPATH=<tree>:<tree>/benchmarks python rw_single_thread.py 128
    MEM=1 ...                                                             # in memory
    PROF=1 ...                                                            # with cProfile
"""

import cProfile
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time

from benchlib.gram import per_adapter_grams

from safelora_ray.formats.peft.digest import OutputDigest
from safelora_ray.formats.peft.read import read_adapter
from safelora_ray.formats.peft.write import write_adapter
from safelora_ray.storage import open_storage

POOL = "/tmp/p22/pool"
st = open_storage(POOL)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
ids = sorted(f"{t}/{a}" for t in os.listdir(POOL) for a in os.listdir(f"{POOL}/{t}"))[:n]
out = tempfile.mkdtemp(dir="/tmp")
bufs: dict[str, bytearray] = {}


def buf(size: int) -> bytearray:
    b = bufs.get("b")
    if b is None or len(b) < size:
        b = bufs["b"] = bytearray(size)
    return b


def one(i: str) -> str:
    ad = read_adapter(st, i, i, buffer=buf)
    per_adapter_grams(ad)
    d = OutputDigest()
    dest = None if os.environ.get("MEM") else os.path.join(out, i.replace("/", "_"))
    write_adapter(ad, {}, dest, None, "", d)
    return d.value()


for i in ids[:4]:
    one(i)
pr = cProfile.Profile() if os.environ.get("PROF") else None
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
if pr:
    pr.enable()
for i in ids:
    one(i)
if pr:
    pr.disable()
t1 = time.perf_counter()
r1 = resource.getrusage(resource.RUSAGE_SELF)
k = 1e3 / len(ids)
print(f"user {k * (r1.ru_utime - r0.ru_utime):.2f} sys {k * (r1.ru_stime - r0.ru_stime):.2f} "
      f"wall {k * (t1 - t0):.2f} ms/adapter")
if pr:
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
shutil.rmtree(out)
