"""Issue 23, thirteenth session: sequential PUT latencies (ms) on SeaweedFS with a given volume
size and growth step, and the CPU seconds (client / server / machine). With the tests'
64 MiB volumes grown one at a time, the PUT that fills a volume waits ~0.2 s while the master
grows the next. From the repository root (workdir, volume MiB, volumes per growth):

    PYTHONPATH=.:benchmarks python benchmarks/results/issue23/session13/put-latency.py \\
        /tmp/lat 64 1
"""

import os
import sys
import time
from pathlib import Path

import bench_s3
from benchlib.s3 import SeaweedS3

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
s3 = SeaweedS3(root, volume_size_mb=int(sys.argv[2]), volumes_per_growth=int(sys.argv[3]))
try:
    clock = bench_s3.CpuClock(s3.weed.pid)
    body = os.urandom(4 * 2**20)
    t0 = time.perf_counter()
    for size in (4 * 2**20, 600, 4 * 2**20):
        lat = []
        c0 = clock.read()
        for i in range(40):
            t = time.perf_counter()
            s3.client.put_object(Bucket=s3.bucket, Key=f"x/{size}/{t0}/{i}", Body=body[:size])
            lat.append(1e3 * (time.perf_counter() - t))
        print(size, "B, PUT ms:", " ".join(f"{x:.0f}" for x in lat),
              bench_s3.CpuClock.spent(c0, clock.read()), flush=True)
finally:
    s3.stop()
