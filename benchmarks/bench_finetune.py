"""Benchmark: project-model on a Llama-2-70B-shaped full fine-tune, non-targets as sparse holes.

Three checkpoints with the exact tensor names and shapes of Llama-2-70B (bf16, 10 GB shards +
index): base, aligned (base + a rank-8 update on q/v) and the fine-tune (aligned + residuals on
q/v: some along the alignment update, some random, so a threshold selects some but not all).
q_proj/v_proj are real in the first ``--layers`` layers; every other tensor of all 80 layers is
a sparse hole, so each model is ~127 GB apparent and a few GB on disk. The alignment set is
built first (not timed here: ``bench_scale.py`` measures builds), then ``project-model`` runs on
Ray workers and must read *every* byte of the fine-tune (holes read back as zeros), stream the
non-targets through in chunks and write the output with its holes kept.

Reports the bytes read against the bytes that must be read (the fine-tune's files, the aligned
q/v and the set's matrices), wall time, GB/s of fine-tune bytes, the output's allocated size,
and the peak RSS of the driver and every Ray process: a worker must stay within a few modules
(a q_proj C is 8192² float32 = 256 MiB) while it streams 10 GB files.

Example::

    python benchmarks/bench_finetune.py                       # 2 real layers (CPU: ~2-3 min)
    python benchmarks/bench_finetune.py --layers 80 --device cuda   # the full 70B q/v set
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from bench_scale import entries
from benchlib.models import LLAMA2_70B, UPDATE_RANK, aligned_weight, gen, update_basis, write_pair
from benchlib.monitor import MEMORY_HEADERS, ProcessMonitor, memory_rows
from benchlib.runs import (
    apply_common,
    common_args,
    emit,
    gbps,
    machine_info,
    mib,
    scale_arch,
    scale_args,
    setup_logging,
    timer,
    workdir,
)
from benchlib.runtime import start_ray

from safelora_ray.formats.synthetic import is_target, write_streamed_checkpoint

TARGETS = ("q_proj", "v_proj")
C_Q_BYTES = LLAMA2_70B.hidden ** 2 * 4


def finetuned_weight(name: str, shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """The fine-tune's target: aligned + a residual leaning on the alignment update's column
    space (modules 0, 2, ...: high cosine, kept at τ = 0.35) or random (low: projected)."""
    w = aligned_weight(name, shape, seed).to(torch.float32)
    g = gen(seed, name, "ft")
    resid = torch.randn(*shape, generator=g) * 2e-4
    if index % 2 == 0:
        u = update_basis(name, shape, seed)
        resid += u @ torch.randn(UPDATE_RANK, shape[1], generator=g) * 1e-3
    return w.add_(resid).to(torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    scale_args(p, layers=2)
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--threshold", type=float, default=None,
                     help="threshold mode (default 0.35)")
    sel.add_argument("--num-proj-layers", type=int, default=None, help="number mode")
    common_args(p, storage=False)
    p.set_defaults(repeats=1)
    args = p.parse_args(argv)
    setup_logging()
    apply_common(args)
    if args.threshold is None and args.num_proj_layers is None:
        args.threshold = 0.35

    arch, real = scale_arch(args)
    use_gpu = args.device == "cuda"
    info = machine_info()

    with workdir(args.workdir, args.keep, "bench-finetune-") as root:
        ents = entries(arch, real)
        print(f"writing base, aligned and fine-tuned: {len(ents)} tensors per model, q/v real "
              f"in {real} of {arch.layers} layers, everything else sparse holes, under {root}",
              flush=True)
        shard = int(args.shard_gb * 1e9)
        with timer() as tw:
            pair = write_pair(root / "models", arch, targets=TARGETS, fill="holes",
                              max_shard_bytes=shard, entries=ents)
            order = [n for n, _ in ents if is_target(n, TARGETS)]

            def ft_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
                if not is_target(name, TARGETS):
                    return None
                return finetuned_weight(name, shape, 0, order.index(name))

            ft_info = write_streamed_checkpoint(root / "models" / "finetuned", ents, ft_tensor,
                                                fill="holes", max_shard_bytes=shard)
        ft_uri = str(root / "models" / "finetuned")
        print(f"  written in {tw['s']:.1f} s: {ft_info['files']} file(s) of "
              f"{ft_info['apparent_bytes'] / 1e9:.1f} GB apparent per model, "
              f"{ft_info['allocated_bytes'] / 1e9:.2f} GB on disk", flush=True)
        ray_init_s = start_ray()
        import ray

        from safelora_ray.pipelines.build.config import BuildConfig
        from safelora_ray.pipelines.build.driver import build
        from safelora_ray.pipelines.project_model.driver import FinetuneConfig, project_model

        with timer() as tb:
            aset = build(BuildConfig(base=pair["base"], aligned=pair["aligned"],
                                     out=str(root / "set"), targets=list(TARGETS),
                                     workers=args.workers, use_gpu=use_gpu, progress=False))
        print(f"  alignment set built in {tb['s']:.1f} s", flush=True)
        runs = []
        for rep in range(args.repeats):
            out = root / "out" / f"run-{rep}"
            with ProcessMonitor() as mon, timer() as t:
                res = project_model(FinetuneConfig(
                    alignment=aset.uri, aligned=pair["aligned"], finetuned=ft_uri,
                    out=str(out), threshold=args.threshold,
                    num_proj_layers=args.num_proj_layers, workers=args.workers,
                    use_gpu=use_gpu, progress=False))
            allocated = sum(f.stat().st_blocks * 512 for f in out.glob("*.safetensors"))
            rec = {"repeat": rep, "s": round(t["s"], 3), "bytes_read": res.bytes_read,
                   "must_read": res.must_read_bytes,
                   "read_ratio": round(res.bytes_read / res.must_read_bytes, 5),
                   "gbps": gbps(ft_info["apparent_bytes"], t["s"]),
                   "modules": res.modules, "selected": res.selected, "tau": res.tau,
                   "workers": res.workers, "device": res.device,
                   "stats": {k: round(v, 3) for k, v in res.stats.items()},
                   "output_allocated_bytes": allocated, "memory": mon.summary()}
            runs.append(rec)
            print(f"  repeat {rep}: {t['s']:.1f} s, {rec['gbps']} GB/s of fine-tune bytes, "
                  f"bytes read / must read = {rec['read_ratio']}, {res.selected} of "
                  f"{res.modules} projected", flush=True)
        ray.shutdown()

    mid = sorted(runs, key=lambda r: r["s"])[len(runs) // 2]
    roles = mid["memory"]["roles"]
    worker_peak = max((r["max_peak_rss"] for k, r in roles.items() if k == "SafeLoraWorker"),
                      default=0)
    result: dict[str, Any] = {
        "benchmark": "finetune",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "machine": info, "arch": asdict(arch), "real_layers": real, "targets": list(TARGETS),
        "inputs": {**{k: v for k, v in pair.items() if k not in ("base", "aligned")},
                   "finetuned": ft_info},
        "write_s": round(tw["s"], 1), "build_s": round(tb["s"], 1),
        "ray_init_s": round(ray_init_s, 3), "device": args.device,
        "selection": ({"threshold": args.threshold} if args.threshold is not None
                      else {"num_proj_layers": args.num_proj_layers}),
        "worker_peak_rss": worker_peak,
        "worker_peak_in_q_proj_C": round(worker_peak / C_Q_BYTES, 2),
        "summary": {"s_median": mid["s"], "read_ratio": mid["read_ratio"],
                    "median_run": mid["repeat"]},
        "runs": runs,
    }
    main_rows = [
        ["fine-tune: apparent size / on disk / files",
         f"{ft_info['apparent_bytes'] / 1e9:.1f} GB / {ft_info['allocated_bytes'] / 1e9:.2f} GB"
         f" / {ft_info['files']}"],
        ["target modules (projected)", f"{mid['modules']} ({mid['selected']}, τ = {mid['tau']})"],
        ["bytes that must be read (fine-tune + aligned q/v + the set's matrices)",
         f"{mid['must_read']:,}"],
        ["bytes read (driver + workers, the three inputs)", f"{mid['bytes_read']:,}"],
        ["bytes read / must read", f"{mid['read_ratio']:.4f}"],
        ["project-model wall time", f"{mid['s']:.1f} s ({mid['gbps']} GB/s of fine-tune bytes)"],
        ["output on disk (holes kept)", f"{mid['output_allocated_bytes'] / 1e9:.2f} GB"],
        ["workers x device", f"{mid['workers']} x {mid['device']}"],
        ["compute_s / write_s (sum over workers)",
         f"{mid['stats'].get('compute_s')} / {mid['stats'].get('write_s')}"],
        ["largest worker peak RSS (in q_proj C = 256 MiB units)",
         f"{mib(worker_peak)} MiB ({result['worker_peak_in_q_proj_C']})"],
        ["repeats (median reported)", len(runs)],
    ]
    tables = [
        (f"project-model: Llama-2-70B shapes, q/v real in {real} of {arch.layers} layers",
         ["figure", "value"], main_rows),
        ("peak RSS and CPU time by process role (median run)", MEMORY_HEADERS,
         memory_rows(mid["memory"])),
    ]
    emit(result, tables, args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
