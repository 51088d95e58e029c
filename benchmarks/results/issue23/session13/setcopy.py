"""Issue 23, thirteenth session: a node's copy of a 2 GiB alignment set (7B-shaped, 16 layers)
from SeaweedFS, the old copy (each window fetched, hashed and written one after another; the
``set_cache.py`` of ``OLD_REV``, default ``ca72bb5``) against this tree's (the next window
fetched while one is hashed and written), alternating, with CPU seconds
(client / server / machine). From the repository root:

    PYTHONPATH=.:benchmarks python benchmarks/results/issue23/session13/setcopy.py /tmp/setcopy
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_s3
from benchlib.models import LLAMA2_7B, write_pair
from benchlib.s3 import SeaweedS3

import safelora_ray.formats.set_cache as sc

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
cache = root / "cache"
os.environ["SAFELORA_SET_CACHE"] = str(cache)
rev = os.environ.get("OLD_REV", "ca72bb5")
old_src = subprocess.run(["git", "show", f"{rev}:safelora_ray/formats/set_cache.py"],
                         capture_output=True, text=True, check=True).stdout
old: dict = {}
exec(compile(old_src, f"{rev}:set_cache.py", "exec"), old)  # our own file, at that revision
new_copy = sc._copy_shard
s3 = SeaweedS3(root, volume_size_mb=1024, volumes_per_growth=7)
try:
    from safelora_ray import BuildConfig, build
    from safelora_ray.formats.alignment_set import AlignmentSet

    pair = write_pair(root / "pair", dataclasses.replace(LLAMA2_7B, layers=16), fill="holes")
    uri = build(BuildConfig(base=pair["base"], aligned=pair["aligned"], out=s3.uri("set"),
                            workers=0, progress=False)).uri
    clock = bench_s3.CpuClock(s3.weed.pid)
    for rep in range(3):
        for name, fn in (("old", old["_copy_shard"]), ("new", new_copy)):
            shutil.rmtree(cache, ignore_errors=True)
            sc._copy_shard = fn
            clock.settle(0.25)
            c0 = clock.read()
            t0 = time.perf_counter()
            copy = sc.local_copy(AlignmentSet.open(uri))
            s = time.perf_counter() - t0
            assert copy.local_shards() is not None
            print(rep, name, f"{s:.2f} s", bench_s3.CpuClock.spent(c0, clock.read()), flush=True)
finally:
    s3.stop()
