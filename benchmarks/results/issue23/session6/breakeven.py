"""Issue 23, sixth session: where a private local Ray starts to pay against the in-process
run, on this machine: ``sanitize`` of N adapters with ``workers=0`` (in process) and with
``workers=None`` forced onto Ray (a private local Ray started inside the timed run, as the
product's default does above its bar), interleaved, local storage.

Env: POOL (a directory of tenant-*/adapter-* PEFT adapters), SET (its alignment set), NS
(comma-separated catalog sizes; above the pool's size the pool is linked again under other
tenant names), ORDER (modes, e.g. "inline,ray,ray,inline"), OUT (JSON), NULL=1 (the
null product). Run from the repository root with PYTHONPATH=.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("NULL") == "1":
    os.environ["SAFELORA_BENCH_NULL_PRODUCT"] = "1"

import ray

import safelora_ray.execution.resolve as resolve
from safelora_ray import SanitizeConfig, sanitize


def catalog(pool: Path, n: int, dest: Path) -> Path:
    """N adapters of the pool as hard links; past the pool's size, again as tenant copies."""
    adapters = sorted(p.parent for p in pool.glob("*/*/adapter_config.json"))
    for k in range(n):
        src = adapters[k % len(adapters)]
        rel = src.relative_to(pool)
        d = dest / f"r{k // len(adapters)}-{rel.parts[0]}" / rel.parts[1]
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            os.link(f, d / f.name)
    return dest


def main() -> int:
    pool, aset = Path(os.environ["POOL"]), os.environ["SET"]
    ns = [int(x) for x in os.environ.get("NS", "512,1024").split(",")]
    order = os.environ.get("ORDER", "inline,ray,ray,inline").split(",")
    root = Path(tempfile.mkdtemp(prefix="breakeven-", dir=os.environ.get("TMP", "/tmp")))
    runs = []
    try:
        for n in ns:
            cat = catalog(pool, n, root / f"cat-{n}")
            for i, mode in enumerate(order):
                out = root / f"out-{n}-{i}"
                # ray: what workers=None does above the bar (a private local Ray, its start
                # counted), the bar lowered below N for this run
                saved = resolve.INLINE_MIN_ADAPTERS, resolve.INLINE_ADAPTER_CPUS
                if mode == "ray":
                    resolve.INLINE_MIN_ADAPTERS, resolve.INLINE_ADAPTER_CPUS = 0, 0
                t0 = time.perf_counter()
                try:
                    r = sanitize(SanitizeConfig(
                        alignment=aset, adapters=str(cat), out=str(out), threshold=0.35,
                        workers=0 if mode == "inline" else None, progress=False))
                    s = time.perf_counter() - t0
                finally:
                    resolve.INLINE_MIN_ADAPTERS, resolve.INLINE_ADAPTER_CPUS = saved
                    if ray.is_initialized():
                        ray.shutdown()
                assert r.ok == n and r.error == 0, (r.ok, r.error)
                runs.append({"n": n, "mode": mode, "s": round(s, 2),
                             "ms_per_adapter": round(1e3 * s / n, 1)})
                print(json.dumps(runs[-1]), flush=True)
                shutil.rmtree(out)
            shutil.rmtree(cat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"pool": str(pool), "set": aset, "null_product": os.environ.get("NULL") == "1",
              "cpus": os.cpu_count(), "runs": runs, "command": " ".join(sys.argv)}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
