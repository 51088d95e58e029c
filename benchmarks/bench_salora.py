"""Benchmark: SaLoRA's calibration pass on a Llama-2-7B-shaped model, layer by layer against
the whole model, in tokens per second.

The checkpoint has Llama-2-7B's tensor names and shapes (hidden 4096, 32 heads, intermediate
11008, vocab 32000; ``--layers`` decoder layers), bf16, random weights (N(0, 0.02²), norms 1),
with a full ``config.json``. The calibration set is pre-tokenized random ids: ``--samples``
samples of ``--length`` tokens, the second half of each counted (the "response").

For each mode (``whole``: every weight on the device, the model's forward per batch;
``layers``: one decoder layer's weights at a time, every sample's hidden states pushed
through it) the pass runs in this process through every target layer (``CalibrationRunner``,
as a worker runs it), and reports wall time, forward positions per second, weight loading
time, peak RSS (and peak GPU memory on ``cuda``), and how far the two modes' Σ are apart.
The eigen-decomposition of one module (V_s from Σ, float64) is timed once. With
``--end-to-end`` the whole ``salora-modules`` job also runs (Σ of every module, V_s, the set
written).

Example::

    python benchmarks/bench_salora.py                   # 2 layers, CPU (~3 min on 2 cores)
    python benchmarks/bench_salora.py --device cuda --layers 32 --samples 128 --length 512 \\
        --repeats 3 --end-to-end                        # the full 7B on one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from benchlib.models import LLAMA2_7B, TINY, base_weight
from benchlib.monitor import ProcessMonitor
from benchlib.runs import (
    apply_common,
    common_args,
    emit,
    machine_info,
    median,
    mib,
    setup_logging,
    timer,
    workdir,
)

from safelora_ray.formats.synthetic import Arch, write_streamed_checkpoint


def write_model(path: Path, arch: Arch, seed: int = 0) -> dict[str, Any]:
    """A Llama checkpoint of ``arch`` with random bf16 weights and a complete config."""
    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        if len(shape) == 1:  # RMSNorm weights
            return torch.ones(shape, dtype=torch.bfloat16)
        if name.startswith("model.layers."):
            return base_weight(name, shape, seed)
        return None  # embeddings, lm_head: valid bf16 filler

    info = write_streamed_checkpoint(path, arch.shapes(), tensor, fill="dense")
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": arch.hidden, "intermediate_size": arch.intermediate,
        "num_hidden_layers": arch.layers, "num_attention_heads": arch.heads,
        "num_key_value_heads": arch.kv_heads, "vocab_size": arch.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return info


def calibration(path: Path, samples: int, length: int, vocab: int) -> Path:
    g = torch.Generator().manual_seed(1)
    with open(path, "w") as f:
        for _ in range(samples):
            ids = torch.randint(3, vocab, (length,), generator=g).tolist()
            f.write(json.dumps({"input_ids": ids,
                                "labels": [-100] * (length // 2) + ids[length // 2:]}) + "\n")
    return path


def run_pass(model: Path, cal: Path, targets: tuple[str, ...], mode: str, dtype: str,
             batch_tokens: int, device: str) -> dict[str, Any]:
    """One calibration pass through every target layer, as one worker runs it."""
    from safelora_ray.pipelines.salora.calibration import pretokenized, read_calibration
    from safelora_ray.pipelines.salora.forward import CalibrationJob, CalibrationRunner

    samples = pretokenized(read_calibration(str(cal)))
    job = CalibrationJob("bench", str(model), (model / "config.json").read_text(), targets,
                         dtype, mode, batch_tokens, 32)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sigmas: dict[str, torch.Tensor] = {}
    with ProcessMonitor(pids=[os.getpid()]) as mon, timer() as t:
        runner = CalibrationRunner(job, samples, device)
        layers = sorted({tm.layer for _, tm in runner.targets.values()})
        for layer in layers:
            res = runner.run_to(layer)
            sigmas.update(res["sigmas"])
        stats = dict(runner.stats)
        runner.close()
        del runner
    forward_s = stats["forward_s"] + stats["prelude_s"]
    out = {
        "mode": mode, "wall_s": round(t["s"], 3), "forward_s": round(forward_s, 3),
        "load_s": round(stats["load_s"], 3), "bytes_read": stats["bytes_read"],
        "positions": samples.positions, "counted_tokens": samples.tokens,
        "tokens_per_s_forward": round(samples.positions / forward_s, 1),
        "tokens_per_s_wall": round(samples.positions / t["s"], 1),
        "peak_rss": mon.summary()["roles"].get("driver", {}).get("max_peak_rss", 0),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }
    return {"figures": out, "sigmas": sigmas}


def time_eigen(model: Path, sigma: torch.Tensor, module: str, rank: int,
               device: str) -> float:
    from safelora_ray.core.safety_basis import safety_basis
    from safelora_ray.formats.checkpoint import Checkpoint, read_ref

    ckpt = Checkpoint.open(str(model))
    w, _ = read_ref(ckpt.storage, ckpt.ref(module + ".weight"))
    w = w.to(device)
    s = sigma.to(device)
    t0 = time.perf_counter()
    safety_basis(w, s, rank)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (32 = Llama-2-7B)")
    p.add_argument("--samples", type=int, default=8, help="calibration samples")
    p.add_argument("--length", type=int, default=128, help="tokens per sample")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--safety-rank", type=int, default=32)
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--modes", default="layers,whole", help="comma-separated: whole, layers")
    p.add_argument("--end-to-end", action="store_true",
                   help="also run the whole salora-modules job (V_s of every module, the set)")
    common_args(p, storage=False)
    p.set_defaults(repeats=1)
    args = p.parse_args(argv)
    setup_logging()
    apply_common(args)

    arch = replace(LLAMA2_7B, layers=args.layers)
    rank = args.safety_rank
    if args.smoke:
        arch = replace(TINY, layers=2)
        args.samples, args.length, rank, args.repeats = 3, 16, 4, 1
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = machine_info()

    with workdir(args.workdir, args.keep, "bench-salora-") as root:
        print(f"writing a {arch.params / 1e9:.2f}B-parameter Llama ({arch.layers} layers of "
              f"Llama-2-7B shapes) under {root} ...", flush=True)
        with timer() as tw:
            ck = write_model(root / "model", arch)
        cal = calibration(root / "cal.jsonl", args.samples, args.length, arch.vocab)
        print(f"  written in {tw['s']:.1f} s ({ck['apparent_bytes'] / 1e9:.2f} GB)", flush=True)
        # Imported before the clock starts (a worker imports them once, at its first layer).
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

        from safelora_ray.pipelines.salora.forward import require_transformers

        require_transformers()
        runs: list[dict[str, Any]] = []
        kept: dict[str, dict[str, torch.Tensor]] = {}
        for rep in range(args.repeats):
            for mode in modes:
                print(f"pass {rep + 1}/{args.repeats}: {mode} on {device} ...", flush=True)
                r = run_pass(root / "model", cal, targets, mode, args.dtype,
                             args.batch_tokens, device)
                runs.append({"repeat": rep, **r["figures"]})
                kept[mode] = r["sigmas"]
        diff = None
        if len(kept) == 2:
            a, b = kept["whole"], kept["layers"]
            diff = max(float((a[g] - b[g]).abs().max() / a[g].abs().max()) for g in a)
        first = next(iter(next(iter(kept.values())).items()))
        eigen_s = time_eigen(root / "model", first[1], first[0], rank, device)
        e2e = None
        if args.end_to_end:
            from safelora_ray.pipelines.salora.modules import SaloraConfig, salora_modules

            print("end to end: salora-modules ...", flush=True)
            res = salora_modules(SaloraConfig(
                model=str(root / "model"), calibration=str(cal), out=str(root / "set"),
                targets=targets, safety_rank=rank, dtype=args.dtype, mode="auto",
                batch_tokens=args.batch_tokens, workers=args.workers,
                use_gpu=device == "cuda", progress=False))
            e2e = {"duration_s": round(res.duration_s, 3), "workers": res.workers,
                   "device": res.device, "mode": res.mode, "modules": res.num_modules,
                   **res.stats}

    summary = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        summary[mode] = {k: median([r[k] for r in rs])
                         for k in ("wall_s", "forward_s", "load_s", "tokens_per_s_forward",
                                   "tokens_per_s_wall", "peak_rss")}
        if device == "cuda":
            summary[mode]["gpu_peak_bytes"] = max(r["gpu_peak_bytes"] for r in rs)
    result = {
        "benchmark": "salora",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "machine": info, "arch": asdict(arch), "targets": list(targets),
        "samples": args.samples, "length": args.length, "dtype": args.dtype,
        "device": device, "safety_rank": rank, "batch_tokens": args.batch_tokens,
        "model_bytes": ck["apparent_bytes"], "runs": runs, "summary": summary,
        "sigma_max_rel_diff_whole_vs_layers": diff,
        "eigen_one_module_s": round(eigen_s, 3), "eigen_module": first[0],
        "end_to_end": e2e,
    }
    rows = []
    for mode, s in summary.items():
        rows.append([mode, s["wall_s"], s["forward_s"], s["load_s"],
                     s["tokens_per_s_forward"], s["tokens_per_s_wall"],
                     mib(s["peak_rss"]),
                     mib(s["gpu_peak_bytes"]) if device == "cuda" else "-"])
    tables = [(f"Calibration pass, {arch.layers} layer(s) of Llama-2-7B shapes, "
               f"{args.samples} x {args.length} tokens, {args.dtype}, {device}",
               ["mode", "wall s", "forward s", "load s", "positions/s (forward)",
                "positions/s (wall)", "peak RSS MiB", "peak GPU MiB"], rows),
              ("Other figures", ["figure", "value"], [
                  ["Σ max relative difference, whole vs layers",
                   f"{diff:.2e}" if diff is not None else "-"],
                  [f"V_s of one module ({first[0].rsplit('.', 2)[-1]}, r_s={rank}) from Σ",
                   f"{eigen_s:.2f} s"],
                  *([["end to end (salora-modules)",
                      f"{e2e['duration_s']:.2f} s, {e2e['modules']} modules, "
                      f"{e2e['tokens_per_s']:,.0f} positions/s forward"]] if e2e else []),
              ])]
    emit(result, tables, args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
