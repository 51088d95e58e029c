"""Benchmark: loading a Llama-2-70B-shaped alignment set, with and without its digests checked.

The set has the modules ``bench_scale.py`` builds (q_proj and v_proj of ``--layers`` layers of
Llama-2-70B, fast form: C is 8192 x 8192 float32 = 256 MiB per q_proj, 1024 x 1024 per
v_proj), written by the product's own writer (``SafetensorsWriter`` with its digests, files of
at most 2 GiB, ``publish``) with random matrices instead of computed ones: what a load reads
is the same, and the build's hours of compute are skipped. A copy of it has its digests
removed, as a set written before they existed: its modules load as every set's did before
(one ranged read per tensor, nothing checked).

"Loading the set" is what a holder does before serving: ``AlignmentSet.open`` and
``MatrixCache.load_all`` (every module read into memory). The two copies are loaded in turns
(the order alternating per repeat), from the page cache (written just before: the fastest
reads, so the largest relative cost of checking). Also timed: ``AlignmentSet.verify``
(``inspect --verify``: every shard read whole, SHA-256).

Example::

    python benchmarks/bench_set_load.py                  # 8 layers: a 2.1 GB set, ~1 min
    python benchmarks/bench_set_load.py --layers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from benchlib.models import LLAMA2_70B, TINY
from benchlib.runs import emit, machine_info, median, setup_logging, workdir

from safelora_ray.formats.alignment_set import (
    FORMAT,
    FORMAT_VERSION,
    AlignmentSet,
    ManifestRow,
    content_id,
    publish,
)
from safelora_ray.formats.integrity import FileHasher
from safelora_ray.formats.safetensors import SafetensorsWriter
from safelora_ray.formats.synthetic import Arch
from safelora_ray.pipelines.sanitize.projection import MatrixCache
from safelora_ray.planning.plan import DEFAULT_MAX_FILE_BYTES
from safelora_ray.storage import open_storage


def write_set(out: Path, arch: Arch, layers: int) -> dict[str, int]:
    """A fast-form q/v set of ``layers`` layers of ``arch``; returns its size and files."""
    mods = []
    kv = arch.hidden // arch.heads * arch.kv_heads
    for layer in range(layers):
        for kind, d_out in (("q_proj", arch.hidden), ("v_proj", kv)):
            mods.append((f"model.layers.{layer}.self_attn.{kind}", layer, kind, d_out))
    files: list[list[tuple[str, int, str, int]]] = [[]]
    size = 0
    for m in mods:
        n = 4 * m[3] ** 2
        if files[-1] and size + n > DEFAULT_MAX_FILE_BYTES:
            files.append([])
            size = 0
        files[-1].append(m)
        size += n
    storage = open_storage(str(out))
    g = torch.Generator().manual_seed(0)
    rows, shards = [], {}
    for j, group in enumerate(files):
        path = f"shards/part-00000-{j:04d}.safetensors"
        hasher = FileHasher()
        (out / "shards").mkdir(parents=True, exist_ok=True)
        layout = [(name, "F32", (d, d)) for name, _, _, d in group]
        with SafetensorsWriter(out / path, layout, {"format": FORMAT}, hasher) as w:
            for name, _, _, d in group:
                w.write(name, torch.randn(d, d, generator=g))
        shards[path] = {"sha256": hasher.file_digest(), "bytes": (out / path).stat().st_size}
        for name, layer, kind, d in group:
            rows.append(ManifestRow(
                module=name, tensor=name + ".weight", layer=layer, kind=kind,
                shape=(d, arch.hidden), form="C", stored_shape=(d, d), shard=path, norm=1.0,
                source_digest="bench", base_dtype="BF16", aligned_dtype="BF16",
                digest=hasher.tensors[name]))
    method = {"name": "safelora-fast"}
    md = {"format": FORMAT, "format_version": FORMAT_VERSION,
          "content_id": content_id({"method": method, "targets": ["q_proj", "v_proj"]}, rows),
          "method": method, "targets": ["q_proj", "v_proj"], "num_modules": len(rows),
          "shards": sorted(shards), "stored_bytes": sum(s["bytes"] for s in shards.values())}
    publish(storage, rows, md, shards)
    return {"bytes": md["stored_bytes"], "files": len(shards), "modules": len(rows)}


def strip_digests(src: Path, dst: Path) -> None:
    """``src`` as a set written before digests existed."""
    shutil.copytree(src, dst)
    md = json.loads((dst / "alignment.json").read_text())
    del md["integrity"]
    (dst / "alignment.json").write_text(json.dumps(md))
    pq.write_table(pq.read_table(dst / "manifest.parquet").drop(["digest"]),
                   dst / "manifest.parquet")


def load_s(uri: str) -> tuple[float, float]:
    """Seconds to open the set and load every module (a holder's warm-up): wall, and CPU of
    this process (all its threads)."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    cache = MatrixCache(AlignmentSet.open(uri), "cpu")
    cache.load_all()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    del cache
    gc.collect()
    return dt, dc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="layers of q/v modules (80 = all)")
    p.add_argument("--repeats", type=int, default=5, help="loads of each copy")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out-json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny widths (the smoke test)")
    args = p.parse_args(argv)
    setup_logging()
    arch = TINY if args.smoke else LLAMA2_70B
    info = machine_info()
    with workdir(args.workdir, args.keep, "bench-set-load-") as root:
        t0 = time.perf_counter()
        written = write_set(root / "new", arch, args.layers)
        strip_digests(root / "new", root / "old")
        print(f"set written in {time.perf_counter() - t0:.1f} s: {written}", flush=True)
        runs: dict[str, list[float]] = {"old": [], "new": []}
        cpu: dict[str, list[float]] = {"old": [], "new": []}
        for rep in range(args.repeats):
            for which in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                wall, c = load_s(str(root / which))
                runs[which].append(wall)
                cpu[which].append(c)
            print(f"  repeat {rep}: old {runs['old'][-1]:.3f} s, new {runs['new'][-1]:.3f} s "
                  f"(CPU {cpu['old'][-1]:.3f} / {cpu['new'][-1]:.3f} s)", flush=True)
        t0 = time.perf_counter()
        AlignmentSet.open(str(root / "new")).verify()
        verify_s = time.perf_counter() - t0
    old, new = median(runs["old"]), median(runs["new"])
    old_min, new_min = min(runs["old"]), min(runs["new"])
    cpu_old, cpu_new = median(cpu["old"]), median(cpu["new"])
    result = {
        "benchmark": "set_load",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "machine": info, "layers": args.layers, "set": written, "cache": "warm",
        "runs_s": runs, "cpu_s": cpu, "old_median_s": round(old, 3),
        "new_median_s": round(new, 3), "overhead": round(new / old - 1, 4),
        "overhead_min": round(new_min / old_min - 1, 4),
        "cpu_overhead": round(cpu_new / cpu_old - 1, 4), "verify_s": round(verify_s, 3),
    }
    gb = written["bytes"] / 1e9
    rows = [
        ["set", f"{written['modules']} modules, {gb:.2f} GB in {written['files']} file(s)"],
        ["load without digests (as before), median", f"{old:.3f} s ({gb / old:.2f} GB/s)"],
        ["load checking every tensor, median", f"{new:.3f} s ({gb / new:.2f} GB/s)"],
        ["**cost of the check** (medians / fastest loads)",
         f"{100 * (new / old - 1):+.1f} % / {100 * (new_min / old_min - 1):+.1f} %"],
        ["fastest load, as before / checked", f"{old_min:.3f} / {new_min:.3f} s"],
        ["CPU time of the load (all threads), medians",
         f"{cpu_old:.3f} / {cpu_new:.3f} s ({100 * (cpu_new / cpu_old - 1):+.1f} %)"],
        ["inspect --verify (every shard whole, SHA-256)", f"{verify_s:.2f} s"],
    ]
    emit(result, [(f"loading a Llama-2-70B-shaped set ({args.layers} layers of q/v), "
                   f"{args.repeats} loads of each copy, warm cache",
                   ["figure", "value"], rows)], args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
