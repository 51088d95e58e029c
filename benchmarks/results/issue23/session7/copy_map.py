"""Issue 23, seventh session: a node's first run, step by step. A 7B-shaped set (LAYERS of
its layers, default 16) built onto SeaweedFS, then REPEATS times: the node's copy removed,
made (``local_copy``), mapped with its digests checked (``SharedSet.map_local``), and mapped
again; wall and CPU of this process and of the S3 server for each step."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchlib.models import LLAMA2_7B, write_pair
from benchlib.s3 import SeaweedS3


def cpu(pid: int | None = None) -> float:
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="copy-map-", dir=os.environ.get("BENCH_TMPDIR")))
    cache = root / "set-cache"
    os.environ["SAFELORA_SET_CACHE"] = str(cache)
    from safelora_ray import BuildConfig, build
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.formats.set_cache import local_copy
    from safelora_ray.pipelines.sanitize.shared_set import SharedSet

    s3 = SeaweedS3(root)
    try:
        arch = dataclasses.replace(LLAMA2_7B, layers=int(os.environ.get("LAYERS", "16")))
        pair = write_pair(root / "pair", arch, fill="holes")
        uri = build(BuildConfig(base=pair["base"], aligned=pair["aligned"],
                                out=s3.uri("set"), workers=0, progress=False)).uri
        shutil.rmtree(root / "pair")

        def step(name: str, fn: Any) -> object:
            c0, s0, w0 = cpu(), cpu(s3.weed.pid), time.perf_counter()
            out = fn()
            print(f"  {name:<10} wall {time.perf_counter() - w0:6.2f} s  cpu {cpu() - c0:6.2f} s"
                  f"  server cpu {cpu(s3.weed.pid) - s0:6.2f} s", flush=True)
            return out

        import logging

        import safelora_ray.formats.set_cache as set_cache
        logging.getLogger(set_cache.__name__).setLevel(logging.INFO)
        # WINDOWS: the copy's window sizes in MiB to rotate through (default: the code's)
        windows = [int(w) for w in os.environ.get("WINDOWS", "").split(",") if w] or [0]
        for rep in range(int(os.environ.get("REPEATS", "3"))):
            shutil.rmtree(cache, ignore_errors=True)
            time.sleep(3)
            w = windows[rep % len(windows)]
            if w:
                set_cache.WINDOW_BYTES = w * 2**20
            print(f"rep {rep} window {set_cache.WINDOW_BYTES >> 20} MiB", flush=True)
            aset = AlignmentSet.open(uri)
            step("copy", lambda a=aset: local_copy(a))
            shared = step("map", lambda a=aset: SharedSet.map_local(a))
            del shared
            step("map again", lambda: SharedSet.map_local(AlignmentSet.open(uri)))
    finally:
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
