"""Benchmark: alignment-set build — bytes read, speed against the storage's own read speed,
peak memory of every process.

Writes a Llama-2-7B-shaped base/aligned pair (exact per-layer shapes, fewer layers by default)
in the Hugging Face layout (sharded safetensors + index, bf16), then, per repeat and on the
same bytes:

1. reads exactly the build's target byte ranges with the same Storage (``read_into``),
   sequentially and with N threads;
2. builds the alignment set on a local Ray, sampling the peak RSS of the driver and of every
   Ray process.

Example::

    python benchmarks/bench_build.py                      # 4 layers of 7B, CPU, local disk
    python benchmarks/bench_build.py --layers 32 --device cuda --out-json build-7b-h100.json
    python benchmarks/bench_build.py --storage s3 --layers 2

The page cache is warm unless ``--cold`` (then every file's cached pages are dropped with
``posix_fadvise(DONTNEED)`` before each measurement).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

from benchlib.floors import checkpoint_files
from benchlib.measure import build_tables, measure_build
from benchlib.models import LLAMA2_7B, TINY, write_pair
from benchlib.runs import (
    apply_common,
    common_args,
    emit,
    machine_info,
    setup_logging,
    timer,
    workdir,
)
from benchlib.runtime import actor_startup_s, start_ray
from benchlib.s3 import MotoS3

from safelora_ray.formats.synthetic import Arch

TARGETS = ("q_proj", "v_proj")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="layers (Llama-2-7B has 32)")
    p.add_argument("--hidden", type=int, default=LLAMA2_7B.hidden)
    p.add_argument("--heads", type=int, default=LLAMA2_7B.heads)
    p.add_argument("--kv-heads", type=int, default=LLAMA2_7B.kv_heads)
    p.add_argument("--intermediate", type=int, default=LLAMA2_7B.intermediate)
    p.add_argument("--vocab", type=int, default=LLAMA2_7B.vocab)
    p.add_argument("--fill", choices=("dense", "holes"), default="dense",
                   help="non-target tensors: real bytes on disk (dense) or sparse holes")
    p.add_argument("--shard-gb", type=float, default=1.0, help="checkpoint shard size (GB)")
    p.add_argument("--read-threads", type=int, default=None,
                   help="threads of the raw threaded read (default: 2 x workers, as the build "
                        "reads base and aligned of a module at once in every worker)")
    p.add_argument("--cold", action="store_true",
                   help="drop the files' cached pages before each measurement (local only)")
    common_args(p)
    args = p.parse_args(argv)
    setup_logging()
    apply_common(args)

    arch = Arch(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate,
                args.vocab)
    if args.smoke:
        arch = replace(TINY, layers=2)
        args.repeats = 1
    if args.cold and args.storage != "local":
        p.error("--cold applies to local storage only")
    use_gpu = args.device == "cuda"

    info = machine_info()
    with workdir(args.workdir, args.keep, "bench-build-") as root:
        print(f"writing the pair ({arch}) under {root} ...", flush=True)
        with timer() as tw:
            pair = write_pair(root / "models", arch, targets=TARGETS, fill=args.fill,
                              max_shard_bytes=int(args.shard_gb * 1e9))
        print(f"  written in {tw['s']:.1f} s: {pair['files_per_model']} file(s) per model, "
              f"{pair['apparent_bytes_per_model'] / 1e9:.2f} GB per model", flush=True)
        s3 = None
        if args.storage == "s3":
            s3 = MotoS3(root)
            base_uri = s3.upload_tree(pair["base"], "models/base")
            aligned_uri = s3.upload_tree(pair["aligned"], "models/aligned")

            def out_uri(rep: int) -> str:
                return s3.uri(f"sets/run-{rep}")
        else:
            base_uri, aligned_uri = pair["base"], pair["aligned"]

            def out_uri(rep: int) -> str:
                return str(root / "sets" / f"run-{rep}")
        try:
            ray_init_s = start_ray()
            import ray

            from safelora_ray.execution import resolve_workers

            res = resolve_workers(args.workers, use_gpu, None, small=False)
            threads = args.read_threads or 2 * res.num_workers
            cold = (checkpoint_files(pair["base"], pair["aligned"])
                    if args.cold else None)
            m = measure_build(base_uri=base_uri, aligned_uri=aligned_uri,
                              out_uri=out_uri, targets=TARGETS, workers=args.workers,
                              use_gpu=use_gpu, repeats=args.repeats,
                              read_threads=threads, cold_files=cold)
            startup = (actor_startup_s(res.num_workers, use_gpu)
                       if not args.smoke else float("nan"))
            ray.shutdown()
        finally:
            if s3 is not None:
                s3.stop()

    result = {
        "benchmark": "build",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "machine": info,
        "arch": asdict(arch), "targets": list(TARGETS),
        "inputs": {k: v for k, v in pair.items() if k not in ("base", "aligned")},
        "storage": args.storage, "cache": "cold (fadvise)" if args.cold else "warm",
        "device": args.device, "workers": res.num_workers,
        "ray_init_s": round(ray_init_s, 3), "actor_startup_s": round(startup, 3),
        **m,
    }
    line = (f"{arch.layers} layers of hidden {arch.hidden}, {args.storage}, "
            f"{result['cache']} cache, {res.num_workers} {args.device} worker(s)")
    tables = build_tables(m, line)
    tables[1][2].append(["Ray: start-up of the worker actors (probe)", round(startup, 3)])
    emit(result, tables, args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
