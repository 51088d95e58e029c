"""Benchmark: fleet sanitization against the full-model-load approach of the official code.

Inputs (same for both sides, same run): a Llama-shaped base/aligned pair (default ~134M
parameters: hidden 768, 12 layers, intermediate 2048, vocab 32000, bf16, HF layout) and a
pool of PEFT LoRA adapters (r = 8 on every q_proj and v_proj, bf16); the catalog of size N is
the first N adapters of the pool.

- **ours**: one job = ``build`` + ``sanitize`` of the catalog of N inside one
  ``worker_session`` (both counted in the total), fresh alignment set and output each run, in
  each of ``--modes``:

  - ``auto``: the product's default on a machine with no Ray cluster configured (the CLI on a
    laptop or a CI runner): a job this small runs in this process, no Ray started;
  - ``inline``: ``workers=0`` (in this process whatever the size);
  - ``ray``: worker actors on a local Ray started once for the mode (``ray.init`` is not in
    the totals: a cluster is started once; the ratio including it is reported too); every
    job starts its workers (one import of torch per worker process), as a Ray Job does.
- **baseline** (the official IBM/SafeLoRA approach, one process): for every adapter, load the
  base and the aligned models fully (every tensor of every shard, ``safetensors.torch.
  load_file``, as ``from_pretrained`` reads them), compute ``C = V Vᵀ/‖V‖`` for each target
  module, compute every module's cosine on the dense d x d products and project per SPEC §2
  (rounded to 5 decimals, ``<=`` τ), write the adapter with ``safetensors.torch.save_file``.
  The baseline runs in the driver between our runs (Ray idle), ``--baseline-per-repeat``
  distinct adapters per repeat, so both sides see the same load on a shared machine. Its
  per-adapter cost is constant (nothing is shared between adapters), so its time for N is N x
  its median per-adapter time (``--baseline-per-repeat 0``: every adapter of the largest
  catalog, once, summed).

The baseline's outputs are compared with ours (same projected modules, B within one bf16
rounding step), so the ratio compares equal work.

Example::

    python benchmarks/bench_fleet.py                              # N = 1, 16, 64, 256 on CPU
    python benchmarks/bench_fleet.py --arch llama2-7b --fill holes --n 256,1024,2048 \\
        --modes ray --device cuda --workers-per-gpu 4 --batch-size 64 --max-in-flight 4 \\
        --baseline-per-repeat 1 \\
        --out-json fleet-7b-h100.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import common
import torch

TARGETS = ("q_proj", "v_proj")
#: Ray system setting (read from the environment by ``ray.init``): modules every worker
#: process imports when it starts, before any task or actor needs it.
PRELOAD_ENV = "RAY_preload_python_modules"
PRELOAD = "torch,safelora_ray.pipelines.build,safelora_ray.pipelines.sanitize"
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
            # load_file maps the file lazily on CPU: copy every tensor into its own memory,
            # as from_pretrained's load_state_dict (or .to("cuda")) does.
            loaded = load_file(str(f), device=device)
            sd.update({k: t.clone() for k, t in loaded.items()} if device == "cpu" else loaded)
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
        del proj, ad
        torch.cuda.empty_cache()  # give the GPU memory back to our workers' processes
    return {"s": time.perf_counter() - t0, "load_s": t_load,
            "compute_write_s": time.perf_counter() - t1, "cos": cos,
            "projected": sorted(projected)}


class Comparison:
    """Our sanitized adapters vs the baseline's (projected modules and B values), checked
    after each of our runs for the baseline adapters that run covered."""

    def __init__(self, pool_adapters: list[Path], pool_root: Path, baseline_out: Path) -> None:
        self.pool, self.root, self.baseline_out = pool_adapters, pool_root, baseline_out
        self.done: dict[int, tuple[bool, float, str | None]] = {}

    def check_run(self, out_uri: str, n: int, baseline: list[dict[str, Any]]) -> None:
        from safetensors.torch import load, load_file

        from safelora_ray.storage import open_storage

        st = open_storage(out_uri)
        for b in baseline:
            i = b["index"]
            if i >= n or i in self.done:
                continue
            aid = self.pool[i].relative_to(self.root).as_posix()
            src = load_file(str(self.pool[i] / "adapter_model.safetensors"))
            mine = load(st.read(f"{aid}/adapter_model.safetensors"))
            theirs = load_file(str(self.baseline_out / aid / "adapter_model.safetensors"))
            if set(mine) != set(theirs):
                self.done[i] = (False, float("inf"), f"{aid}: different tensor names")
                continue
            sel = sorted(k[len("base_model.model."): -len(".lora_B.weight")] for k in mine
                         if k.endswith("lora_B.weight") and not torch.equal(mine[k], src[k]))
            rel = 0.0
            for k in mine:
                x, y = mine[k].float(), theirs[k].float()
                rel = max(rel, float((x - y).abs().max()) / (float(y.abs().max()) or 1.0))
            same = sel == b["projected"]
            self.done[i] = (same, rel, None if same else
                            f"{aid}: ours projected {sel}, baseline {b['projected']}")

    def summary(self, baseline: list[dict[str, Any]]) -> dict[str, Any]:
        same = sum(1 for ok, _, _ in self.done.values() if ok)
        rel = max((r for _, r, _ in self.done.values()), default=0.0)
        wanted = len({b["index"] for b in baseline})
        return {"adapters_compared": len(self.done), "same_selection": same,
                "max_abs_diff_over_max_abs": rel,
                "differences": [d for _, _, d in self.done.values() if d][:10],
                # one bf16 rounding step of the largest |B| (C is float32 on both sides, the
                # norm float64 here and float32 there: the cast to bf16 may round either way)
                "equal": (len(self.done) == wanted and same == len(self.done)
                          and rel <= 2**-7)}


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
    p.add_argument("--modes", default="auto,ray",
                   help="how ours runs, comma-separated: auto (the product's default on a "
                        "machine with no Ray cluster configured: this process for a small "
                        "job, else a local Ray it starts, counted), inline (workers=0), ray "
                        "(worker actors on a local Ray started once, not counted)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.35)
    p.add_argument("--batch-size", type=int, default=8, help="adapters per sanitize task")
    p.add_argument("--max-in-flight", type=int, default=2, help="batches queued per worker")
    p.add_argument("--workers-per-gpu", type=int, default=1,
                   help="sanitize workers sharing one GPU (ray mode, --device cuda)")
    p.add_argument("--baseline-per-repeat", type=int, default=3,
                   help="adapters the baseline processes in each repeat (distinct adapters; "
                        "0 = every adapter of the largest N, once); a larger N is timed as "
                        "N x the median per-adapter time")
    p.add_argument("--fill", choices=("dense", "holes"), default="dense",
                   help="non-target tensors of the pair: real bytes or sparse holes")
    p.add_argument("--keep-outputs", action="store_true",
                   help="keep every run's sanitized adapters (local storage; default: removed "
                        "after each run once checked)")
    p.add_argument("--warm-workers", action="store_true",
                   help="start Ray with RAY_preload_python_modules=torch,"
                        "safelora_ray.pipelines.build,safelora_ray.pipelines.sanitize: worker "
                        "processes import torch before they are needed, as on a long-lived "
                        "cluster configured for safelora-ray")
    common.common_args(p)
    args = p.parse_args(argv)
    common.setup_logging()

    arch = ARCHS[args.arch]
    if args.layers:
        arch = replace(arch, layers=args.layers)
    ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    if args.smoke:
        arch, ns, args.repeats, args.baseline_per_repeat = common.TINY, [2], 1, 2
        args.batch_size = 1  # several batches in flight per worker: the threaded actor path
    use_gpu = args.device == "cuda"
    gpus = torch.cuda.device_count()
    if use_gpu and args.workers and args.workers > gpus * args.workers_per_gpu:
        p.error(f"--workers {args.workers} > {gpus} GPU(s) x --workers-per-gpu "
                f"{args.workers_per_gpu}: the extra workers would never be scheduled")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"auto", "inline", "ray"}:
        p.error("--modes: a comma-separated list of auto, inline, ray")
    modes = sorted(set(modes), key=["auto", "inline", "ray"].index)
    chunks = args.repeats * len(modes)  # the baseline runs before each repeat of each mode
    if args.baseline_per_repeat == 0:
        plan = [max(ns)] + [0] * (chunks - 1)
    else:
        plan = [min(args.baseline_per_repeat, max(ns))] * chunks
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
        os.environ.pop("RAY_ADDRESS", None)  # "auto" is a machine with no cluster configured
        import ray

        from safelora_ray.pipelines.build import BuildConfig, build
        from safelora_ray.pipelines.sanitize import SanitizeConfig, sanitize
        from safelora_ray.workers import worker_session

        torch.set_num_threads(info["cpu_count"] or 1)
        base_out = root / "baseline-out"
        baseline: list[dict[str, Any]] = []
        bmon = common.ProcessMonitor(pids=[os.getpid()])
        comparison = Comparison(pool, pool_root, base_out)
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {m: {n: [] for n in ns}
                                                            for m in modes}
        ray_init_s = startup = float("nan")
        workers = 1

        def run_baseline(k: int) -> None:
            # In this process between our runs (no work of ours in flight), so that both
            # sides see the same load on a shared machine.
            with bmon:
                for _ in range(k):
                    idx = len(baseline) % len(pool)  # distinct adapters while there are
                    ad = pool[idx]
                    out = base_out / ad.relative_to(pool_root)
                    baseline.append(baseline_one(pair["base"], pair["aligned"], ad, out,
                                                 args.threshold, args.device))
                    baseline[-1]["index"] = idx
                    print(f"  baseline adapter {len(baseline) - 1}: "
                          f"{baseline[-1]['s']:.2f} s (load {baseline[-1]['load_s']:.2f} s)",
                          flush=True)

        def one_job(mode: str, rep: int, n: int) -> dict[str, Any]:
            """build + sanitize of N adapters, as one job: the workers start once."""
            nonlocal workers
            wk = {"auto": None, "inline": 0, "ray": args.workers}[mode]
            gpu = use_gpu if mode == "ray" else None
            tag = f"{mode}-n{n}-r{rep}"
            was_up = ray.is_initialized()
            with common.ProcessMonitor() as mon, worker_session(), common.timer() as t:
                with common.timer() as tb:
                    bres = build(BuildConfig(base=base_uri, aligned=aligned_uri,
                                             out=uri(f"sets/{tag}"), targets=list(TARGETS),
                                             workers=wk, use_gpu=gpu, progress=False))
                with common.timer() as ts:
                    r = sanitize(SanitizeConfig(
                        alignment=bres.uri, adapters=cat_uri[n], out=uri(f"out-{tag}"),
                        threshold=args.threshold, workers=wk, use_gpu=gpu,
                        batch_size=args.batch_size, max_in_flight=args.max_in_flight,
                        workers_per_gpu=args.workers_per_gpu,
                        run_id=tag, progress=False))
            assert r.ok == n and r.error == 0, (r.ok, r.error, r.errors[:3])
            if ray.is_initialized() and not was_up:
                ray.shutdown()  # auto started a local Ray for this job (its time is counted)
            workers = max(workers, bres.workers)
            out = uri(f"out-{tag}")
            rec = {"s": round(t["s"], 3), "build_s": round(tb["s"], 3),
                   "sanitize_s": round(ts["s"], 3), "executor": bres.device
                   if bres.workers == 0 else f"{bres.workers} worker(s)",
                   "build": {"workers": bres.workers, "device": bres.device,
                             "stats": bres.stats},
                   "ok": r.ok, "projected": r.projected, "out": out,
                   "timings": report_timings(out, tag, args.batch_size),
                   "memory": mon.summary()}
            comparison.check_run(out, n, baseline)
            if args.storage == "local" and not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)  # bounded disk at large N
                shutil.rmtree(uri(f"sets/{tag}"), ignore_errors=True)
            print(f"  {mode} N={n} run {rep}: {t['s']:.2f} s (build {tb['s']:.2f} s, "
                  f"sanitize {ts['s']:.2f} s; {n / t['s']:.1f} adapters/s)", flush=True)
            return rec

        if args.warm_workers:
            os.environ[PRELOAD_ENV] = PRELOAD
        try:
            k = 0
            for mode in modes:  # auto/inline first: they expect no Ray running
                if mode == "ray":
                    ray_init_s = common.start_ray()
                for rep in range(args.repeats):
                    run_baseline(plan[k])
                    k += 1
                    for n in ns:
                        runs[mode][n].append(one_job(mode, rep, n))
                if mode == "ray":
                    startup = (common.actor_startup_s(args.workers, use_gpu)
                               if not args.smoke else float("nan"))
                    ray.shutdown()
            check = comparison.summary(baseline)
        finally:
            os.environ.pop(PRELOAD_ENV, None)
            if s3 is not None:
                s3.stop()

    per_adapter = common.median([b["s"] for b in baseline])
    k_base = len(baseline)
    # CPU seconds (user + system, every process): the load-independent cost of each side.
    base_cpu_per_adapter = bmon.summary()["cpu_s"] / max(k_base, 1)
    rows, results = [], []
    for mode in modes:
        for n in ns:
            rs = runs[mode][n]
            total = common.median([r["s"] for r in rs])
            build_s = common.median([r["build_s"] for r in rs])
            san = common.median([r["sanitize_s"] for r in rs])
            measured = n <= k_base and args.baseline_per_repeat == 0
            base_t = sum(b["s"] for b in baseline[:n]) if measured else n * per_adapter
            ours_cpu = common.median([r["memory"]["cpu_s"] for r in rs])
            base_cpu = n * base_cpu_per_adapter
            init = ray_init_s if mode == "ray" else 0.0
            rec = {
                "mode": mode, "n": n, "executor": rs[0]["executor"], "build_s": build_s,
                "sanitize_s": san, "total_s": round(total, 3),
                "ours_cpu_s": round(ours_cpu, 2), "baseline_cpu_s": round(base_cpu, 2),
                "cpu_ratio": round(base_cpu / ours_cpu, 2) if ours_cpu > 0 else None,
                "ours_adapters_per_s": round(n / total, 3),
                "baseline_s": round(base_t, 3), "baseline_measured_sum": measured,
                "baseline_adapters_per_s": round(n / base_t, 3),
                "ratio": round(base_t / total, 2),
                "ratio_incl_ray_init": round(base_t / (total + init), 2),
                "runs": rs,
            }
            results.append(rec)
            rows.append([mode, n, rec["executor"], round(build_s, 2), round(san, 2),
                         round(total, 2), rec["ours_adapters_per_s"], round(base_t, 1),
                         rec["baseline_adapters_per_s"], rec["ratio"],
                         rec["ratio_incl_ray_init"], rec["ours_cpu_s"], rec["baseline_cpu_s"],
                         rec["cpu_ratio"]])
    result = {
        "benchmark": "fleet",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "machine": info, "arch": asdict(arch), "params": arch.params,
        "targets": list(TARGETS), "rank": args.rank, "threshold": args.threshold,
        "storage": args.storage, "device": args.device, "modes": modes, "workers": workers,
        "warm_workers": args.warm_workers,
        "batch_size": args.batch_size, "max_in_flight": args.max_in_flight,
        "workers_per_gpu": args.workers_per_gpu, "repeats": args.repeats,
        "inputs": {k: v for k, v in pair.items() if k not in ("base", "aligned")},
        "ray_init_s": round(ray_init_s, 3), "actor_startup_s": round(startup, 3),
        "baseline": {"adapters_measured": k_base, "per_adapter_s_median": round(per_adapter, 3),
                     "cpu_s_per_adapter": round(base_cpu_per_adapter, 3),
                     "load_s_median": round(common.median([b["load_s"] for b in baseline]), 3),
                     "compute_write_s_median": round(
                         common.median([b["compute_write_s"] for b in baseline]), 3),
                     "per_adapter_s": [round(b["s"], 3) for b in baseline],
                     "memory": bmon.summary()},
        "equality": check,
        "results": results,
    }
    last = modes[-1]
    biggest = sorted(runs[last][max(ns)], key=lambda r: r["s"])[len(runs[last][max(ns)]) // 2]
    tm = biggest["timings"]
    where = [
        ["Ray: ray.init (once per cluster; in no total except 'ratio incl. ray.init')",
         round(ray_init_s, 3)],
        ["Ray: start-up of the worker actors (probe)", round(startup, 3)],
        [f"{last}, N={max(ns)} (median run): build wall time", biggest["build_s"]],
        [f"{last}, N={max(ns)}: sanitize wall time", biggest["sanitize_s"]],
        ["  Σ read_s (ledger, listing, read + validate adapters)", tm["read_s"]],
        ["  Σ compute_s (C B, scores, selection; a batch's share per adapter)", tm["compute_s"]],
        ["  Σ write_s (write, digest, publish, ledger)", tm["write_s"]],
        ["  Σ batch_s (worker time in batches, all included)", tm["batch_s_sum"]],
        ["baseline per adapter: load both models", result["baseline"]["load_s_median"]],
        ["baseline per adapter: C, cosines, projection, save",
         result["baseline"]["compute_write_s_median"]],
    ]
    extrap = "" if args.baseline_per_repeat == 0 else " (N x median per adapter)"
    common.emit(result, [
        (f"fleet: {arch.params / 1e6:.0f}M-parameter pair, r={args.rank} q/v adapters, "
         f"{args.storage}, {args.device}; ours = build + sanitize as one job"
         + (", warm workers" if args.warm_workers else ""),
         ["mode", "N", "ran on", "build s", "sanitize s", "total s", "ours ad/s",
          f"baseline s{extrap}", "baseline ad/s", "ratio", "ratio incl. ray.init",
          "CPU-s ours", "CPU-s baseline", "CPU-s ratio"], rows),
        ("baseline vs ours: equal outputs", ["figure", "value"],
         [["adapters compared", check["adapters_compared"]],
          ["same projected modules", check["same_selection"]],
          ["max |B_ours − B_baseline| / max |B|", f"{check['max_abs_diff_over_max_abs']:.2e}"],
          ["equal", str(check["equal"])]]),
        (f"where the time goes (N={max(ns)}, median run)", ["figure", "seconds"], where),
        (f"peak RSS and CPU time by process role ({last}, N={max(ns)}, median run)",
         common.MEMORY_HEADERS, common.memory_rows(biggest["memory"])),
        ("peak RSS and CPU time (baseline, all its adapters, in the driver process)",
         common.MEMORY_HEADERS, common.memory_rows(result["baseline"]["memory"])),
    ], args.out_json)
    if not check["equal"]:
        print("WARNING: the baseline's outputs differ from ours: " + json.dumps(check))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
