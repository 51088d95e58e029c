"""Per-adapter CPU of FleetSanitizer.process in this process (all threads), the null product,
batches of 16 of the 7B pool: the I/O worker's work without Ray.

POOL: the adapters and set kept by ``bench_fleet.py --arch llama2-7b --fill holes --inputs
/tmp/p22`` (its ``pool`` and ``set``); OUT: a scratch output folder. Run with PYTHONPATH set to
the tree measured; MARK=<file>: write this process's pid there once warmed up and wait 2 s
(for ``perf record -p``).
"""

import json
import os
import resource
import shutil
import time

os.environ["SAFELORA_BENCH_NULL_PRODUCT"] = "1"

from safelora_ray.pipelines.sanitize.config import SanitizeConfig
from safelora_ray.pipelines.sanitize.worker import FleetSanitizer
from safelora_ray.planning.catalog import iter_catalog

ROOT = os.environ.get("POOL", "/tmp/p22")
OUT = os.environ.get("OUT", "/tmp/s22m/out")
shutil.rmtree(OUT, ignore_errors=True)
refs = list(iter_catalog(f"{ROOT}/pool"))[:352]
sel = SanitizeConfig(alignment=f"{ROOT}/set", adapters=f"{ROOT}/pool", out=OUT,
                     threshold=0.35).selection
san = FleetSanitizer(f"{ROOT}/set", OUT, sel, run_id="m", force=True)
san.process(refs[:32])  # warm-up: the set loaded, the buffers pooled
refs = refs[32:]
if os.environ.get("MARK"):
    with open(os.environ["MARK"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(2)
ru0 = resource.getrusage(resource.RUSAGE_SELF)
c0, t0 = time.process_time(), time.perf_counter()
for i in range(0, len(refs), 16):
    r = san.process(refs[i:i + 16])
    assert all(a["status"] == "ok" for a in r["adapters"]), r["adapters"][0]
c1, t1 = time.process_time(), time.perf_counter()
ru1 = resource.getrusage(resource.RUSAGE_SELF)
n = len(refs)
print(json.dumps({"tree": os.environ.get("PYTHONPATH"), "cpu_ms": round(1e3 * (c1 - c0) / n, 2),
                  "user_ms": round(1e3 * (ru1.ru_utime - ru0.ru_utime) / n, 2),
                  "sys_ms": round(1e3 * (ru1.ru_stime - ru0.ru_stime) / n, 2),
                  "minflt": round((ru1.ru_minflt - ru0.ru_minflt) / n),
                  "wall_ms": round(1e3 * (t1 - t0) / n, 2)}))
shutil.rmtree(OUT, ignore_errors=True)
