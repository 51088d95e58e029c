"""Benchmark: alignment-set build — bytes read, speed against the storage's own read speed,
peak memory of every process.

Writes a Llama-2-7B-shaped base/aligned pair (exact per-layer shapes, fewer layers by default)
in the Hugging Face layout (sharded safetensors + index, bf16), then, per repeat and on the
same bytes:

1. reads exactly the build's target byte ranges with the same Storage (``read_into``),
   sequentially and with N threads;
2. builds the alignment set in each of ``--modes`` (default ``auto,ray``: the product's
   default on a machine with no cluster, which runs in this process since issue 22, and on the
   worker actors of a local Ray started beforehand), sampling the peak RSS of the driver and of
   every Ray process; the start-up share (build call → first module read, over the build) and
   build / max(best raw read, write + fsync of the set's bytes) of each.

Example::

    python benchmarks/bench_build.py                      # 4 layers of 7B, CPU, local disk
    python benchmarks/bench_build.py --layers 32 --device cuda --out-json build-7b-h100.json
    python benchmarks/bench_build.py --storage s3 --layers 2
    python benchmarks/bench_build.py --modes inprocess,ray --layers 8 --fill holes

The page cache is warm unless ``--cold`` (then every file's cached pages are dropped with
``posix_fadvise(DONTNEED)`` before each measurement).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

from benchlib.floors import checkpoint_files
from benchlib.measure import build_tables, measure_build_mode, modes_table, parse_modes
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
    p.add_argument("--modes", default="auto,ray",
                   help="where the build runs, in turn: auto (the default rule, no cluster), "
                        "inprocess (workers=0), ray (worker actors on a local Ray)")
    common_args(p)
    args = p.parse_args(argv)
    modes = parse_modes(args.modes)
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

            def out_uri(run: str) -> str:
                return s3.uri(f"sets/run-{run}")
        else:
            base_uri, aligned_uri = pair["base"], pair["aligned"]

            def out_uri(run: str) -> str:
                return str(root / "sets" / f"run-{run}")
        try:
            import torch

            # The raw threaded read: two readers (base, aligned) per device worker on Ray.
            per = torch.cuda.device_count() if use_gpu else (info["cpu_count"] or 1)
            threads = args.read_threads or 2 * (args.workers or max(1, per))
            cold = (checkpoint_files(pair["base"], pair["aligned"])
                    if args.cold else None)
            results = {}
            for mode in modes:
                print(f"mode {mode}:", flush=True)
                results[mode] = measure_build_mode(
                    mode, workers=args.workers, use_gpu=use_gpu, smoke=args.smoke,
                    base_uri=base_uri, aligned_uri=aligned_uri,
                    out_uri=lambda rep, mode=mode: out_uri(f"{mode}-{rep}"),
                    targets=TARGETS, repeats=args.repeats, read_threads=threads,
                    cold_files=cold)
        finally:
            if s3 is not None:
                s3.stop()

    first = results[modes[0]]
    result = {
        "benchmark": "build",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "machine": info,
        "arch": asdict(arch), "targets": list(TARGETS),
        "inputs": {k: v for k, v in pair.items() if k not in ("base", "aligned")},
        "storage": args.storage, "cache": "cold (fadvise)" if args.cold else "warm",
        "device": args.device, "workers": first["summary"]["workers"],
        # The first mode's figures at the top, as before --modes; every mode's under "modes".
        "ray_init_s": first["ray_init_s"], "actor_startup_s": first["actor_startup_s"],
        "summary": first["summary"], "runs": first["runs"],
        "modes": results,
    }
    tables = [modes_table(results)]
    for mode, r in results.items():
        line = (f"{arch.layers} layers of hidden {arch.hidden}, {args.storage}, "
                f"{result['cache']} cache, mode {mode}: {r['summary']['workers']} "
                f"{r['summary']['device']} worker(s) (0 = this process)")
        tables += build_tables(r, line)
    emit(result, tables, args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
