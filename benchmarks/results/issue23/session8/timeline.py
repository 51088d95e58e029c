"""Issue 23, eighth session: the timeline of one in-process sanitize s3:// → s3:// (600
7B-shaped adapters, 16 layers, the null product, the set's copy warm, SeaweedFS on loopback):
every call of the product's S3 storage (``read``, ``read_into``, ``put_bytes``, ``list``)
timed, then per kind of object (weights, configs, ledger records, reports) the count, the
mean latency and the requests in flight every half second. Run from the repository root with
``PYTHONPATH=. .venv/bin/python benchmarks/results/issue23/session8/timeline.py``.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["SAFELORA_BENCH_NULL_PRODUCT"] = "1"  # read when the product's modules load
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session7"))

from benchlib.s3 import SeaweedS3
from profile_inline import warm_catalog

CALLS: list[tuple[str, str, float, float]] = []


def record(cls: Any) -> None:
    for name in ("read_into", "read", "put_bytes", "list"):
        orig = getattr(cls, name)

        def timed(self: Any, path: str, *a: Any, _orig: Any = orig, _name: str = name,
                  **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _orig(self, path, *a, **k)
            finally:
                CALLS.append((_name, str(path), t0, time.perf_counter()))

        setattr(cls, name, timed)


def kind(call: str, path: str) -> str:
    what = ("ledger" if path.startswith("_ledger") else "report" if "_reports" in path
            else "weights" if path.endswith(".safetensors") else "config"
            if path.endswith("adapter_config.json") else "other")
    return f"{call} {what}"


def main() -> None:
    from safelora_ray import SanitizeConfig, sanitize
    from safelora_ray.storage.s3 import S3Storage

    root = Path(tempfile.mkdtemp(prefix="timeline-"))
    s3 = SeaweedS3(root)
    try:
        aset = warm_catalog(root, s3)
        record(S3Storage)
        time.sleep(5)
        t0 = time.perf_counter()
        sanitize(SanitizeConfig(alignment=aset, adapters=s3.uri("cat"), out=s3.uri("out"),
                                threshold=0.35, workers=0, progress=False))
        end = time.perf_counter() - t0
    finally:
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)
    by: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for call, path, a, b in CALLS:
        by[kind(call, path)].append((a - t0, b - t0))
    print(f"run {end:.2f} s")
    for k, spans in sorted(by.items()):
        print(f"{k:18s} {len(spans):5d} calls, first at {min(a for a, _ in spans):6.2f} s, "
              f"last done {max(b for _, b in spans):6.2f} s, "
              f"mean {1e3 * sum(b - a for a, b in spans) / len(spans):6.1f} ms")
    print("in flight every 0.5 s: weights PUT / weights GET / the rest")
    for i in range(int(end / 0.5) + 1):
        t = i * 0.5
        n = [sum(a <= t < b for a, b in by.get(k, ())) for k in ("put_bytes weights",
                                                                 "read_into weights")]
        rest = sum(a <= t < b for k, s in by.items() if "weights" not in k for a, b in s)
        print(f"{t:5.1f} s {n[0]:3d} {n[1]:3d} {rest:3d}")


if __name__ == "__main__":
    main()
