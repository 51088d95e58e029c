"""Benchmark: a Llama-2-70B-shaped pair built end to end, non-target tensors as sparse holes.

Both checkpoints have the exact tensor names and shapes of Llama-2-70B (hidden 8192, 80
layers, 64 heads, 8 kv heads: q_proj 8192x8192, v_proj 1024x8192, intermediate 28672, vocab
32000), bf16, sharded at 10 GB with an index, as on the Hub. The q_proj/v_proj of the first
``--layers`` layers are real (random, aligned = base + a rank-8 update + noise); every other
tensor — k/o/MLP/norms of all 80 layers, embeddings, lm_head — is a sparse hole: the files
have the full apparent size (~127 GB per model with 8 real layers) but occupy only the real
tensors on disk. Layers past ``--layers`` have no q/v at all (holes would read as zeros,
and an identical pair has no alignment matrix), so the read ratio stays meaningful: the build
must find ~1% of the bytes in ~127 GB files.

Reports the apparent and allocated sizes, bytes read against target bytes, raw read speed of
the same bytes, wall time, and the peak RSS of the driver and every Ray process; a worker
must stay bounded by a few modules (a q_proj C is 8192² float32 = 256 MiB).

Example::

    python benchmarks/bench_scale.py                           # 8 real layers (CPU: ~2 min)
    python benchmarks/bench_scale.py --layers 80 --device cuda # the full 70B q/v set (24 GB
                                                               # real on disk for the pair)
    python benchmarks/bench_scale.py --projection exact --energy 0.9 --layers 1 --workers 1
                                       # the exact projection: an eigendecomposition per module

With ``--projection exact`` the JSON also holds each module's k and kept energy, and the
compute time per module kind (``per_module_s``), from which a full 70B build is extrapolated
(80 q_proj + 80 v_proj modules) and printed as such.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from benchlib.floors import checkpoint_files
from benchlib.measure import build_tables, measure_build_mode, modes_table, parse_modes
from benchlib.models import LLAMA2_70B, write_pair
from benchlib.runs import (
    apply_common,
    common_args,
    emit,
    machine_info,
    mib,
    scale_arch,
    scale_args,
    setup_logging,
    timer,
    workdir,
)

from safelora_ray.formats.synthetic import Arch, is_target

TARGETS = ("q_proj", "v_proj")
C_Q_BYTES = LLAMA2_70B.hidden ** 2 * 4  # one q_proj C in float32: 256 MiB


def entries(arch: Arch, real_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the 70B model, minus the q/v of the layers past ``real_layers``."""
    out = []
    for name, shape in arch.shapes():
        if is_target(name, TARGETS) and int(name.split(".")[2]) >= real_layers:
            continue
        out.append((name, shape))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    scale_args(p, layers=8)
    p.add_argument("--read-threads", type=int, default=None,
                   help="threads of the raw threaded read (default 2 x workers)")
    p.add_argument("--cold", action="store_true",
                   help="drop the files' cached pages before each measurement")
    p.add_argument("--projection", choices=["fast", "exact"], default="fast",
                   help="stored form (exact: U_k, needs --rank or --energy)")
    p.add_argument("--rank", type=int, default=None, help="exact: k per module")
    p.add_argument("--energy", type=float, default=None,
                   help="exact: the smallest k keeping this fraction of Σσ²")
    p.add_argument("--modes", default="auto,ray",
                   help="where the build runs, in turn: auto (the default rule, no cluster), "
                        "inprocess (workers=0), ray (worker actors on a local Ray)")
    common_args(p, storage=False)
    p.set_defaults(repeats=1)
    args = p.parse_args(argv)
    modes = parse_modes(args.modes)
    setup_logging()
    apply_common(args)

    arch, real = scale_arch(args)
    use_gpu = args.device == "cuda"
    info = machine_info()

    with workdir(args.workdir, args.keep, "bench-scale-") as root:
        ents = entries(arch, real)
        print(f"writing the pair: {len(ents)} tensors per model, q/v real in {real} of "
              f"{arch.layers} layers, everything else sparse holes, under {root} ...",
              flush=True)
        with timer() as tw:
            pair = write_pair(root / "models", arch, targets=TARGETS, fill="holes",
                              max_shard_bytes=int(args.shard_gb * 1e9), entries=ents)
        print(f"  written in {tw['s']:.1f} s: {pair['files_per_model']} file(s) of "
              f"{pair['apparent_bytes_per_model'] / 1e9:.1f} GB apparent per model, "
              f"{pair['allocated_bytes_per_model'] / 1e9:.2f} GB on disk", flush=True)
        import torch

        per = torch.cuda.device_count() if use_gpu else (info["cpu_count"] or 1)
        threads = args.read_threads or 2 * (args.workers or max(1, per))
        cold = checkpoint_files(pair["base"], pair["aligned"]) if args.cold else None
        results: dict[str, dict] = {}
        for mode in modes:
            print(f"mode {mode}:", flush=True)
            sets = root / "sets" / mode
            m = measure_build_mode(
                mode, workers=args.workers, use_gpu=use_gpu, smoke=args.smoke,
                base_uri=pair["base"], aligned_uri=pair["aligned"],
                out_uri=lambda rep, sets=sets: str(sets / f"run-{rep}"), targets=TARGETS,
                repeats=args.repeats, read_threads=threads, cold_files=cold,
                build_kwargs={"projection": args.projection, "rank": args.rank,
                              "energy": args.energy})
            m["exact"] = exact_figures(sets / f"run-{m['summary']['median_run']}", m, arch)
            mid = next(r for r in m["runs"] if r["repeat"] == m["summary"]["median_run"])
            m["worker_peak_rss"] = max((r["max_peak_rss"] for k, r in
                                        mid["memory"]["roles"].items()
                                        if k == "SafeLoraWorker"), default=0)
            # A 70B set is ~22 GB: the next mode's must fit beside the pair.
            shutil.rmtree(sets, ignore_errors=True)
            results[mode] = m

    # The first mode's figures at the top, as before --modes; every mode's under "modes".
    m = results[modes[0]]
    s = m["summary"]
    # The worker actors' peak (ray mode); in this process the driver's is the build's.
    worker_peak = max(r["worker_peak_rss"] for r in results.values())
    result = {
        "benchmark": "scale",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "machine": info, "arch": asdict(arch), "real_layers": real,
        "targets": list(TARGETS),
        "inputs": {k: v for k, v in pair.items() if k not in ("base", "aligned")},
        "write_s": round(tw["s"], 1),
        "cache": "cold (fadvise)" if args.cold else "warm",
        "device": args.device, "workers": s["workers"], "ray_init_s": m["ray_init_s"],
        "worker_peak_rss": worker_peak,
        "worker_peak_in_q_proj_C": round(worker_peak / C_Q_BYTES, 2),
        "projection": {"kind": args.projection, "rank": args.rank, "energy": args.energy},
        "exact": m["exact"],
        "summary": s, "runs": m["runs"],
        "modes": results,
    }
    apparent = 2 * pair["apparent_bytes_per_model"]
    tables = [modes_table(results)]
    for mode, r in results.items():
        rs = r["summary"]
        mtables = build_tables(r, f"Llama-2-70B shapes, q/v real in {real} of "
                                  f"{arch.layers} layers, mode {mode}: {rs['workers']} "
                                  f"{rs['device']} worker(s) (0 = this process), "
                                  f"{result['cache']} cache")
        mtables[0][2][0:0] = [
            ["apparent size of the pair (2 models)", f"{apparent / 1e9:.1f} GB"],
            ["allocated on disk (2 models)",
             f"{2 * pair['allocated_bytes_per_model'] / 1e9:.2f} GB"],
            ["files per model", pair["files_per_model"]],
            ["bytes read / apparent size", f"{rs['bytes_read'] / apparent:.5f}"],
        ]
        if r["worker_peak_rss"]:
            mtables[0][2].append(["largest worker peak RSS (in q_proj C = 256 MiB units)",
                                  f"{mib(r['worker_peak_rss'])} MiB "
                                  f"({round(r['worker_peak_rss'] / C_Q_BYTES, 2)})"])
        tables += mtables
        if r["exact"]:
            tables.append((f"exact projection ({mode}): k per module and the cost of the "
                           "eigendecomposition", ["figure", "value"], r["exact"]["rows"]))
    emit(result, tables, args.out_json)
    return 0


def exact_figures(set_dir: Path, m: dict, arch: Arch) -> dict | None:
    """k and kept energy per module (from the manifest), the compute time per module (the
    build's compute_s split by module kind through their d_out² d_in cost), and the
    extrapolation to every q/v module of the architecture, marked as such."""
    import pyarrow.parquet as pq

    manifest = set_dir / "manifest.parquet"
    if not manifest.exists():
        return None
    rows = pq.read_table(manifest).to_pylist()
    if not rows or rows[0].get("form") != "U":
        return None
    mid = next(r for r in m["runs"] if r["repeat"] == m["summary"]["median_run"])
    compute = mid["stats"].get("compute_s", 0.0)
    # The eigendecomposition of V Vᵀ (d_out x d_out) dominates: cost ∝ d_out³ (+ d_out² d_in
    # for the Gram matrix); split the measured compute time by that weight.
    weight = {r["module"]: r["shape"][0] ** 3 + r["shape"][0] ** 2 * r["shape"][1]
              for r in rows}
    total_w = sum(weight.values())
    per_kind: dict[str, list[float]] = {}
    for r in rows:
        per_kind.setdefault(r["kind"], []).append(compute * weight[r["module"]] / total_w)
    per_module = {k: sum(v) / len(v) for k, v in per_kind.items()}
    full = {k: arch.layers * s for k, s in per_module.items()}
    out_rows = [[f"{r['module']} ({r['shape'][0]} x {r['shape'][1]})",
                 f"k = {r['proj_rank']}, energy kept {r['proj_energy']:.4f}"] for r in rows]
    out_rows += [[f"compute per {k} module (measured here, by cost share)", f"{s:.1f} s"]
                 for k, s in per_module.items()]
    out_rows.append([f"EXTRAPOLATED: {arch.layers} layers x ({', '.join(per_module)}), "
                     "one worker, this CPU", f"{sum(full.values()) / 3600:.2f} h"])
    return {"modules": [{k: r[k] for k in ("module", "shape", "proj_rank", "proj_energy")}
                        for r in rows],
            "per_module_s": per_module, "extrapolated_full_s": full, "rows": out_rows}


if __name__ == "__main__":
    sys.exit(main())
