"""What G = A Aᵀ cost the host per 7B adapter when the I/O threads formed it, against stacking
the batch's A for the engine (which forms G on the set's device now). One thread, 16 adapters
of the proxy's pool (``bench_fleet.py --workdir /tmp/p22 --keep``):

    OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks \\
        python benchmarks/results/issue22/session12/gram_host.py
"""

import os
import time

import torch
from benchlib.gram import per_adapter_grams

from safelora_ray.formats.peft.read import read_adapter
from safelora_ray.storage import open_storage

torch.set_num_threads(1)
POOL = "/tmp/p22/pool"
st = open_storage(POOL)
ids = sorted(f"{t}/{a}" for t in os.listdir(POOL) for a in os.listdir(f"{POOL}/{t}"))[:16]
ads = [read_adapter(st, i, i) for i in ids]


def stack(which):
    return {m: torch.stack([getattr(ad.modules[m], which) for ad in ads]) for m in ads[0].modules}


for name, f in [("G per adapter (the I/O threads, before)",
                 lambda: [per_adapter_grams(a) for a in ads]),
                ("stack the batch's A (now)", lambda: stack("a")),
                ("stack the batch's B (both)", lambda: stack("b"))]:
    f()
    t0 = time.thread_time()
    for _ in range(20):
        f()
    print(f"{name}: {(time.thread_time() - t0) / 20 / len(ads) * 1e3:.2f} ms of CPU an adapter")
