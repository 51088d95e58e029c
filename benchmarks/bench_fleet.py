"""Benchmark: fleet sanitization against the full-model-load approach of the official code.

Inputs (same for both sides, same run): a Llama-shaped base/aligned pair (default ~134M
parameters: hidden 768, 12 layers, intermediate 2048, vocab 32000, bf16, HF layout) and a
pool of PEFT LoRA adapters (r = 8 on every q_proj and v_proj, bf16); the catalog of size N is
the first N adapters of the pool.

- **ours**: ``build`` once + ``sanitize`` the catalog of N (both counted in the total; the
  sanitize-only figure is reported too) on a local Ray, fresh output each run.
- **baseline** (the official IBM/SafeLoRA approach, one process): for every adapter, load the
  base and the aligned models fully (every tensor of every shard, ``safetensors.torch.
  load_file``, as ``from_pretrained`` reads them), compute ``C = V Vᵀ/‖V‖`` for each target
  module, compute every module's cosine on the dense d x d products and project per SPEC §2
  (rounded to 5 decimals, ``<=`` τ), write the adapter with ``safetensors.torch.save_file``.
  Its per-adapter cost is constant (no state is shared between adapters), so it is measured on
  the first ``--baseline-max`` adapters and its time for a larger N is N x the median
  per-adapter time (``--baseline-max 0`` measures every adapter).

The baseline's outputs are compared with ours (same projected modules, B within one bf16
rounding step), so the ratio compares equal work.

Example::

    python benchmarks/bench_fleet.py                              # N = 1, 16, 64, 256 on CPU
    python benchmarks/bench_fleet.py --arch llama2-7b --fill holes --n 256,1024,4096 \\
        --device cuda --batch-size 64 --baseline-max 2 --out-json fleet-7b-h100.json
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import common
import torch

TARGETS = ("q_proj", "v_proj")
ARCHS = {"fleet-100m": common.FLEET_100M, "llama2-7b": common.LLAMA2_7B}


# ---------------------------------------------------------------------------------------------
# The baseline: the official script's approach, per adapter, in this process
# ---------------------------------------------------------------------------------------------


def baseline_one(base_dir: str, aligned_dir: str, adapter_dir: Path, out_dir: Path,
                 threshold: float, device: str) -> dict[str, Any]:
    """Sanitize one adapter the way the official code does, from scratch."""
    import torch.nn.functional as F
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    models = []
    for d in (base_dir, aligned_dir):  # both models, every tensor (from_pretrained reads all)
        sd: dict[str, torch.Tensor] = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            sd.update(load_file(str(f), device=device))
        models.append(sd)
    base, aligned = models
    t_load = time.perf_counter() - t0

    t1 = time.perf_counter()
    proj: dict[str, torch.Tensor] = {}  # official get_aligned_matrix: C = V Vᵀ/‖V‖
    for name in base:
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
            v = aligned[name].float() - base[name].float()
            proj[module] = torch.mm(v, v.t()) / torch.norm(v)
    del models, base, aligned

    weights = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    ad = load_file(str(weights), device=device)
    cos: dict[str, float] = {}
    projected: list[str] = []
    for key in list(ad):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."): -len(".lora_A.weight")]
        b_key = key.replace("lora_A", "lora_B")
        a, b = ad[key].float(), ad[b_key].float()
        w = torch.mm(proj[module], b)
        fw, ori = torch.mm(w, a), torch.mm(b, a)  # official: dense d_out x d_in products
        c = round(F.cosine_similarity(fw.reshape(1, -1), ori.reshape(1, -1)).item(), 5)
        cos[module] = c
        if c <= threshold:
            ad[b_key] = w.to(ad[b_key].dtype)
            projected.append(module)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous().cpu() for k, t in ad.items()},
              str(out_dir / "adapter_model.safetensors"), metadata)
    shutil.copyfile(adapter_dir / "adapter_config.json", out_dir / "adapter_config.json")
    if device == "cuda":
        torch.cuda.synchronize()
    return {"s": time.perf_counter() - t0, "load_s": t_load,
            "compute_write_s": time.perf_counter() - t1, "cos": cos,
            "projected": sorted(projected)}


def compare_outputs(pool_adapters: list[Path], pool_root: Path, baseline_out: Path,
                    ours_uri: str, baseline: list[dict[str, Any]]) -> dict[str, Any]:
    """Our sanitized adapters vs the baseline's: projected modules and B values."""
    from safetensors.torch import load, load_file

    from safelora_ray.storage import open_storage

    ours = open_storage(ours_uri)
    same_selection = 0
    max_rel = 0.0
    diffs = []
    for p, b in zip(pool_adapters, baseline, strict=False):
        aid = p.relative_to(pool_root).as_posix()
        src = load_file(str(p / "adapter_model.safetensors"))
        mine = load(ours.read(f"{aid}/adapter_model.safetensors"))
        theirs = load_file(str(baseline_out / aid / "adapter_model.safetensors"))
        if set(mine) != set(theirs):
            diffs.append(f"{aid}: different tensor names")
            continue
        sel_mine = sorted(k[len("base_model.model."): -len(".lora_B.weight")] for k in mine
                          if k.endswith("lora_B.weight") and not torch.equal(mine[k], src[k]))
        if sel_mine == b["projected"]:
            same_selection += 1
        else:
            diffs.append(f"{aid}: ours projected {sel_mine}, baseline {b['projected']}")
        for k in mine:
            x, y = mine[k].float(), theirs[k].float()
            scale = float(y.abs().max()) or 1.0
            max_rel = max(max_rel, float((x - y).abs().max()) / scale)
    return {"adapters_compared": len(baseline), "same_selection": same_selection,
            "max_abs_diff_over_max_abs": max_rel, "differences": diffs[:10],
            "equal": same_selection == len(baseline) and max_rel <= 2**-7}


def report_timings(out_uri: str, run_id: str, batch_size: int) -> dict[str, float]:
    """Sum the per-adapter timings of a sanitize run's adapters.parquet."""
    import pyarrow.parquet as pq

    from safelora_ray.storage import open_storage

    raw = open_storage(out_uri).read(f"_reports/{run_id}/adapters.parquet")
    t = pq.read_table(io.BytesIO(raw)).to_pydict()
    n = len(t["adapter_id"])
    return {"adapters": n, "read_s": round(sum(t["read_s"]), 3),
            "compute_s": round(sum(t["compute_s"]), 3), "write_s": round(sum(t["write_s"]), 3),
            # every row of a batch carries the batch's time: Σ rows / batch size ≈ Σ batches
            "batch_s_sum": round(sum(t["batch_s"]) / min(batch_size, max(n, 1)), 3)}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="fleet-100m")
    p.add_argument("--layers", type=int, default=None, help="override the arch's layer count")
    p.add_argument("--n", default="1,16,64,256", help="catalog sizes, comma-separated")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.35)
    p.add_argument("--batch-size", type=int, default=8, help="adapters per sanitize task")
    p.add_argument("--max-in-flight", type=int, default=2, help="batches queued per worker")
    p.add_argument("--baseline-max", type=int, default=8,
                   help="adapters the baseline is measured on (0 = every adapter of the "
                        "largest N); larger N are extrapolated from its median")
    p.add_argument("--fill", choices=("dense", "holes"), default="dense",
                   help="non-target tensors of the pair: real bytes or sparse holes")
    common.common_args(p)
    p.set_defaults(repeats=3)
    args = p.parse_args(argv)
    common.setup_logging()

    arch = ARCHS[args.arch]
    if args.layers:
        arch = replace(arch, layers=args.layers)
    ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    if args.smoke:
        arch, ns, args.repeats, args.baseline_max = common.TINY, [1, 3], 1, 2
    use_gpu = args.device == "cuda"
    k_base = max(ns) if args.baseline_max == 0 else min(max(ns), args.baseline_max)
    info = common.machine_info()

    with common.workdir(args.workdir, args.keep, "bench-fleet-") as root:
        print(f"writing the pair ({arch}, {arch.params / 1e6:.0f}M parameters) and "
              f"{max(ns)} adapters under {root} ...", flush=True)
        with common.timer() as tw:
            pair = common.write_pair(root / "models", arch, targets=TARGETS, fill=args.fill,
                                     max_shard_bytes=int(2e9))
            pool_root = root / "pool"
            pool = common.write_adapters(pool_root, arch, max(ns), rank=args.rank,
                                         targets=TARGETS)
            catalogs = {n: common.link_catalog(pool[:n], pool_root, root / f"catalog-{n}")
                        for n in ns}
        print(f"  written in {tw['s']:.1f} s", flush=True)

        # -- baseline first, before Ray starts: it has the machine to itself ---------------
        print(f"baseline (official approach) on {k_base} adapter(s) ...", flush=True)
        torch.set_num_threads(info["cpu_count"] or 1)
        base_out = root / "baseline-out"
        baseline = []
        with common.ProcessMonitor() as bmon:
            for i, ad in enumerate(pool[:k_base]):
                out = base_out / ad.relative_to(pool_root)
                baseline.append(baseline_one(pair["base"], pair["aligned"], ad, out,
                                             args.threshold, args.device))
                print(f"  adapter {i}: {baseline[-1]['s']:.2f} s "
                      f"(load {baseline[-1]['load_s']:.2f} s)", flush=True)
        per_adapter = common.median([b["s"] for b in baseline])

        # -- ours ------------------------------------------------------------------------------
        s3 = None
        if args.storage == "s3":
            s3 = common.MotoS3(root)
            base_uri = s3.upload_tree(pair["base"], "models/base")
            aligned_uri = s3.upload_tree(pair["aligned"], "models/aligned")
            cat_uri = {n: s3.upload_tree(c, f"catalog-{n}") for n, c in catalogs.items()}

            def uri(rel: str) -> str:
                return s3.uri(rel)
        else:
            base_uri, aligned_uri = pair["base"], pair["aligned"]
            cat_uri = {n: str(c) for n, c in catalogs.items()}

            def uri(rel: str) -> str:
                return str(root / rel)
        try:
            import ray

            from safelora_ray.build import BuildConfig, build
            from safelora_ray.ray_utils import plan_workers
            from safelora_ray.sanitize import SanitizeConfig, sanitize

            ray_init_s = common.start_ray()
            workers = plan_workers(args.workers, use_gpu).num_workers
            builds = []
            for rep in range(args.repeats):
                with common.ProcessMonitor() as mon, common.timer() as t:
                    res = build(BuildConfig(base=base_uri, aligned=aligned_uri,
                                            out=uri(f"sets/run-{rep}"), targets=list(TARGETS),
                                            workers=args.workers, use_gpu=use_gpu,
                                            progress=False))
                builds.append({"s": round(t["s"], 3), "stats": res.stats,
                               "memory": mon.summary()})
                print(f"  build {rep}: {t['s']:.2f} s", flush=True)
            build_s = common.median([b["s"] for b in builds])
            set_uri = uri("sets/run-0")

            runs: dict[int, list[dict[str, Any]]] = {}
            for n in ns:
                runs[n] = []
                for rep in range(args.repeats):
                    run_id = f"bench-n{n}-r{rep}"
                    out = uri(f"out-{n}-{rep}")
                    with common.ProcessMonitor() as mon, common.timer() as t:
                        r = sanitize(SanitizeConfig(
                            alignment=set_uri, adapters=cat_uri[n], out=out,
                            threshold=args.threshold, workers=args.workers, use_gpu=use_gpu,
                            batch_size=args.batch_size, max_in_flight=args.max_in_flight,
                            run_id=run_id, progress=False))
                    assert r.ok == n and r.error == 0, (r.ok, r.error, r.errors[:3])
                    runs[n].append({"s": round(t["s"], 3), "ok": r.ok,
                                    "projected": r.projected, "out": out,
                                    "timings": report_timings(out, run_id, args.batch_size),
                                    "memory": mon.summary()})
                    print(f"  sanitize N={n} run {rep}: {t['s']:.2f} s "
                          f"({n / t['s']:.1f} adapters/s)", flush=True)
            startup = common.actor_startup_s(args.workers, use_gpu)
            check = compare_outputs(pool[:k_base], pool_root, base_out,
                                    runs[max(ns)][0]["out"], baseline)
            ray.shutdown()
        finally:
            if s3 is not None:
                s3.stop()

    rows, results = [], []
    for n in ns:
        san = common.median([r["s"] for r in runs[n]])
        total = build_s + san
        if n <= k_base:
            base_t = sum(b["s"] for b in baseline[:n])
            measured = True
        else:
            base_t = n * per_adapter
            measured = False
        ratio = base_t / total
        rec = {
            "n": n, "build_s": build_s, "sanitize_s": san, "total_s": round(total, 3),
            "ours_adapters_per_s": round(n / total, 3),
            "sanitize_only_adapters_per_s": round(n / san, 3),
            "baseline_s": round(base_t, 3), "baseline_measured": measured,
            "baseline_adapters_per_s": round(n / base_t, 3),
            "ratio": round(ratio, 2),
            "ratio_incl_ray_init": round(base_t / (total + ray_init_s), 2),
            "runs": runs[n],
        }
        results.append(rec)
        rows.append([n, round(build_s, 2), round(san, 2), round(total, 2),
                     rec["ours_adapters_per_s"], rec["sanitize_only_adapters_per_s"],
                     round(base_t, 1) if measured else f"{base_t:.1f} (extrap.)",
                     rec["baseline_adapters_per_s"], rec["ratio"],
                     rec["ratio_incl_ray_init"]])
    result = {
        "benchmark": "fleet",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "machine": info, "arch": asdict(arch), "params": arch.params,
        "targets": list(TARGETS), "rank": args.rank, "threshold": args.threshold,
        "storage": args.storage, "device": args.device, "workers": workers,
        "batch_size": args.batch_size, "max_in_flight": args.max_in_flight,
        "repeats": args.repeats, "inputs": {k: v for k, v in pair.items()
                                            if k not in ("base", "aligned")},
        "ray_init_s": round(ray_init_s, 3), "actor_startup_s": round(startup, 3),
        "build_runs": builds, "build_s_median": build_s,
        "baseline": {"adapters_measured": k_base, "per_adapter_s_median": round(per_adapter, 3),
                     "load_s_median": round(common.median([b["load_s"] for b in baseline]), 3),
                     "compute_write_s_median": round(
                         common.median([b["compute_write_s"] for b in baseline]), 3),
                     "per_adapter_s": [round(b["s"], 3) for b in baseline],
                     "memory": bmon.summary()},
        "equality": check,
        "results": results,
    }
    biggest = results[-1]["runs"][len(results[-1]["runs"]) // 2]
    tm = biggest["timings"]
    where = [
        ["Ray: ray.init (once per cluster, not in the totals)", round(ray_init_s, 3)],
        ["Ray: start-up of the worker actors (probe)", round(startup, 3)],
        ["build wall time (median; includes its actor start-up)", build_s],
        [f"sanitize wall time, N={max(ns)}", biggest["s"]],
        ["  Σ read_s (ledger, listing, read + validate adapters)", tm["read_s"]],
        ["  Σ compute_s (scores + selection; C B is in batch_s)", tm["compute_s"]],
        ["  Σ write_s (write, digest, publish, ledger)", tm["write_s"]],
        ["  Σ batch_s (worker time in batches, all included)", tm["batch_s_sum"]],
        ["baseline per adapter: load both models", result["baseline"]["load_s_median"]],
        ["baseline per adapter: C, cosines, projection, save",
         result["baseline"]["compute_write_s_median"]],
    ]
    mem = biggest["memory"]
    common.emit(result, [
        (f"fleet: {arch.params / 1e6:.0f}M-parameter pair, r={args.rank} q/v adapters, "
         f"{args.storage}, {args.device}",
         ["N", "build s", "sanitize s", "total s", "ours ad/s", "sanitize-only ad/s",
          "baseline s", "baseline ad/s", "ratio", "ratio incl. ray.init"], rows),
        ("baseline vs ours: equal outputs", ["figure", "value"],
         [["adapters compared", check["adapters_compared"]],
          ["same projected modules", check["same_selection"]],
          ["max |B_ours − B_baseline| / max |B|", f"{check['max_abs_diff_over_max_abs']:.2e}"],
          ["equal", check["equal"]]]),
        (f"where the time goes (N={max(ns)}, median run)", ["figure", "seconds"], where),
        (f"peak RSS by process role, MiB (sanitize N={max(ns)})",
         ["role", "processes", "max per process", "sum"], common.memory_rows(mem)),
        ("peak RSS, MiB (baseline process)", ["role", "processes", "max per process", "sum"],
         common.memory_rows(result["baseline"]["memory"])),
    ], args.out_json)
    if not check["equal"]:
        print("WARNING: the baseline's outputs differ from ours: " + json.dumps(check))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
