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
    job starts its workers (one import of torch per worker process), as a Ray Job does. The
    build runs on device workers (one per GPU, else one per CPU; ``--build-workers``), the
    sanitize on the pipeline: per node, holders of the alignment set (one per GPU x
    ``--workers-per-gpu``, or on a CPU-only node the first I/O worker) and ``--workers`` I/O
    workers (default one per CPU left), which the build's actors are reused for;
  - ``raydata``: the build as in ``ray`` (its workers stopped when it returns), then the same
    sanitize as a Ray Data pipeline (``raydata_sanitize.py``: read tasks, an actor pool
    holding the set, write tasks), for the comparison with our own executor.
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
rounding step), so the ratio compares equal work; the modes' outputs are compared with each
other byte for byte (the output digests of the reports).

Memory: every process of the run (driver, Ray system processes, worker actors, Ray Data's
workers) is sampled every 50 ms; the figure is the sum of their RSS at the run's peak moment
(and its anonymous part), and the largest sum of their PSS (a page shared by several
processes, such as the alignment set a CPU node keeps in its object store, counted once).
After each sanitize the worker actors are asked what they hold, so
holders of the alignment set and I/O workers are reported apart, with the set's copies.

``--io-floor``: after each of our runs, the plain sequential I/O of the catalog, timed on the
same disk (read every adapter file, write the same bytes to as many files, each fsynced),
and the ratio sanitize time / that floor (the issue's bound where the disk is the limit: a
ratio ≤ 1.25 is ≥ 80 % of what the disk can carry). The floor is also timed with each written
file dropped from the page cache once fsynced (as our outputs are), and the ratio to the
faster of the two is reported too: on a VM, whichever writes into fresh pages pays for them.

``--null-product --fake-gpu``: a CPU proxy of a GPU node's host path. ``--fake-gpu`` starts
the local Ray with one GPU that is not there and runs ours with ``use_gpu=True`` (holders and
I/O workers as on a GPU node; the holder, given the GPU, computes on the CPU);
``--null-product`` replaces the engine's product by a copy of B (the same bytes travel the
same way, the arithmetic is gone), so the set's content does not matter and it is built once
before all runs (``--set-once``, timed apart); each run then starts its workers with the
build of a tiny pair (as a job's build starts them) and sanitizes with the shared set.

CPU: inside each sanitize, every thread of every process of the run (``/proc``, every second
and at the sanitize's start and end): the busiest thread's CPU per adapter (a thread runs on
one core at a time: the cap it puts on a GPU's feed), all processes' CPU per adapter, and
their tables. ``--gil`` adds, per Python process of the sanitize, the share of its samples
in which one of its threads held the GIL (py-spy; it perturbs the run).

Example::

    python benchmarks/bench_fleet.py                              # N = 1, 16, 64, 256 on CPU
    python benchmarks/bench_fleet.py --arch llama2-7b --fill holes --n 2048 --modes ray \\
        --device cuda --batch-size 32 --max-in-flight 2 --baseline-per-repeat 1 \\
        --repeats 1 --io-floor --out-json fleet-7b-h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from benchlib.baseline import TARGETS, Comparison, baseline_one
from benchlib.cpu import summarize
from benchlib.fleet import cpu_tables, median_run, output_digests, report_timings, reuse_inputs
from benchlib.floors import io_floor
from benchlib.gil import GilSampler, py_spy, python_role
from benchlib.models import FLEET_100M, LLAMA2_7B, TINY, link_catalog, write_adapters, write_pair
from benchlib.monitor import MEMORY_HEADERS, ProcessMonitor, memory_rows
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
from benchlib.runtime import actor_startup_s, holder_design, pipeline, start_ray
from benchlib.s3 import MotoS3
from benchlib.workers import (
    release_freed_memory,
    session_actors,
    wait_workers_gone,
    worker_roles,
    worker_states,
)

from safelora_ray.formats.synthetic import MiB

#: The stand-in product of the sanitize's engine (B copied, cosine 1), read from the
#: environment when ``safelora_ray.pipelines.sanitize.projection`` is imported (Ray's workers
#: inherit the driver's environment at ``ray.init``).
NULL_PRODUCT_ENV = "SAFELORA_BENCH_NULL_PRODUCT"
#: Ray system setting (read from the environment by ``ray.init``): modules every worker
#: process imports when it starts, before any task or actor needs it.
PRELOAD_ENV = "RAY_preload_python_modules"
PRELOAD = "torch,safelora_ray.pipelines.build.worker,safelora_ray.pipelines.sanitize.worker"
ARCHS = {"fleet-100m": FLEET_100M, "llama2-7b": LLAMA2_7B}


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
                        "(worker actors on a local Ray started once, not counted), raydata "
                        "(the sanitize as a Ray Data pipeline, raydata_sanitize.py)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.35)
    p.add_argument("--batch-size", type=int, default=8, help="adapters per sanitize task")
    p.add_argument("--max-in-flight", type=int, default=2,
                   help="batches queued per I/O worker")
    p.add_argument("--workers-per-gpu", type=int, default=1,
                   help="holders of the alignment set per GPU (ray mode, --device cuda)")
    p.add_argument("--build-workers", type=int, default=None,
                   help="build workers (ray mode; default one per GPU, else one per CPU); "
                        "--workers counts the sanitize's I/O workers")
    p.add_argument("--io-floor", action="store_true",
                   help="after each run, time plain sequential I/O of the catalog (read every "
                        "adapter file, write + fsync the same bytes) on the same disk, and "
                        "report sanitize time / that floor (local storage)")
    p.add_argument("--raydata-task-cpus", type=float, default=1.0,
                   help="raydata mode: CPUs of each read / write task")
    p.add_argument("--raydata-holder-cpus", type=float, default=None,
                   help="raydata mode: CPUs of each set-holding actor (default 1 on CPU, "
                        "0.25 with a GPU)")
    p.add_argument("--raydata-holder-batch", type=int, default=None,
                   help="raydata mode: adapters per holder call (default --batch-size)")
    p.add_argument("--raydata-fuse-read", action="store_true",
                   help="raydata mode: let Ray Data fuse the read stage into the holder "
                        "actors (its default when their resources are equal, as on CPU); "
                        "without it the reads stay CPU tasks")
    p.add_argument("--baseline-per-repeat", type=int, default=3,
                   help="adapters the baseline processes in each repeat (distinct adapters; "
                        "0 = every adapter of the largest N, once); a larger N is timed as "
                        "N x the median per-adapter time")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the baseline (a 7B-shaped one loads both full models per "
                        "adapter): throughput, memory and --io-floor only; the modes' outputs "
                        "are still compared with each other")
    p.add_argument("--fill", choices=("dense", "holes"), default="dense",
                   help="non-target tensors of the pair: real bytes or sparse holes")
    p.add_argument("--keep-outputs", action="store_true",
                   help="keep every run's sanitized adapters (local storage; default: removed "
                        "after each run once checked)")
    p.add_argument("--null-product", action="store_true",
                   help=f"replace the engine's product by a copy of B ({NULL_PRODUCT_ENV}=1 in "
                        "this process and Ray's workers): the host path's cost alone; implies "
                        "--set-once and --no-baseline")
    p.add_argument("--set-once", action="store_true",
                   help="build the alignment set once before all runs (timed apart); each run "
                        "starts its workers with a tiny pair's build, then sanitizes with it")
    p.add_argument("--fake-gpu", action="store_true",
                   help="a GPU node's sanitize path on a machine without CUDA: Ray started "
                        "with num_gpus=1, ours run with use_gpu=True (the workers given the "
                        "GPU compute on the CPU)")
    p.add_argument("--gil", action="store_true",
                   help="during each sanitize, sample every Python process of the run with "
                        "py-spy (pip install py-spy): how much of the time a thread holds the "
                        "GIL, per process and per thread (perturbs the run)")
    p.add_argument("--gil-rate", type=int, default=100, help="--gil: samples per second")
    p.add_argument("--inputs", default=None,
                   help="reuse inputs written before (DIR/models/{base,aligned} and DIR/pool, "
                        "e.g. a kept --workdir) with the same --arch, --layers, --fill, "
                        "--rank, instead of writing them")
    p.add_argument("--warm-workers", action="store_true",
                   help="start Ray with RAY_preload_python_modules=torch,"
                        "safelora_ray.pipelines.build.worker,"
                        "safelora_ray.pipelines.sanitize.worker: worker "
                        "processes import torch before they are needed, as on a long-lived "
                        "cluster configured for safelora-ray")
    common_args(p)
    args = p.parse_args(argv)
    setup_logging()
    apply_common(args)

    arch = ARCHS[args.arch]
    if args.layers:
        arch = replace(arch, layers=args.layers)
    ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    if args.smoke:
        arch, ns, args.repeats, args.baseline_per_repeat = TINY, [2], 1, 2
        args.batch_size = 1  # several batches in flight per worker: the threaded actor path
    if args.fake_gpu and args.device == "cuda":
        p.error("--fake-gpu stands in for a GPU: not with --device cuda")
    use_gpu = args.device == "cuda" or args.fake_gpu
    if args.device == "cuda" and torch.cuda.device_count() < 1:
        p.error("--device cuda: this machine has no CUDA device")
    if args.gil and py_spy() is None:
        p.error("--gil needs py-spy, which is not installed: pip install py-spy")
    if args.null_product:
        # Before Ray starts and before the sanitize's modules are imported (both read it).
        os.environ[NULL_PRODUCT_ENV] = "1"
        # its outputs are B unprojected: no baseline to compare with, the set's content moot
        args.set_once = args.no_baseline = True
    if args.io_floor and args.storage != "local":
        p.error("--io-floor measures the local disk: use it with --storage local")
    all_modes = ["auto", "inline", "ray", "raydata"]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(all_modes):
        p.error("--modes: a comma-separated list of " + ", ".join(all_modes))
    modes = sorted(set(modes), key=all_modes.index)
    if args.fake_gpu and "raydata" in modes:
        p.error("--fake-gpu: the ray mode's path only (not raydata)")
    if args.set_once and "raydata" in modes:
        p.error("--set-once / --null-product: not with the raydata mode")
    chunks = args.repeats * len(modes)  # the baseline runs before each repeat of each mode
    if args.no_baseline:
        plan = [0] * chunks
    elif args.baseline_per_repeat == 0:
        plan = [max(ns)] + [0] * (chunks - 1)
    else:
        plan = [min(args.baseline_per_repeat, max(ns))] * chunks
    info = machine_info()

    with workdir(args.workdir, args.keep, "bench-fleet-") as root:
        print(f"writing the pair ({arch}, {arch.params / 1e6:.0f}M parameters) and "
              f"{max(ns)} adapters under {root} ...", flush=True)
        with timer() as tw:
            if args.inputs:
                pair, pool_root, pool = reuse_inputs(Path(args.inputs), max(ns))
            else:
                pair = write_pair(root / "models", arch, targets=TARGETS, fill=args.fill,
                                  max_shard_bytes=int(2e9))
                pool_root = root / "pool"
                pool = write_adapters(pool_root, arch, max(ns), rank=args.rank,
                                      targets=TARGETS)
            catalogs = {n: link_catalog(pool[:n], pool_root, root / f"catalog-{n}")
                        for n in ns}
        print(f"  written in {tw['s']:.1f} s", flush=True)

        s3 = None
        if args.storage == "s3":
            s3 = MotoS3(root)
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

        from safelora_ray.execution import worker_session

        build, BuildConfig = pipeline("build").build, pipeline("build").BuildConfig
        sanitize = pipeline("sanitize").sanitize
        SanitizeConfig = pipeline("sanitize").SanitizeConfig
        holders_design = holder_design()
        if args.null_product:
            try:
                projection = importlib.import_module("safelora_ray.pipelines.sanitize.projection")
            except ModuleNotFoundError:
                projection = None
            if not getattr(projection, "NULL_PRODUCT", False):
                p.error(f"--null-product: the code measured did not read {NULL_PRODUCT_ENV} "
                        "(no safelora_ray.pipelines.sanitize.projection.NULL_PRODUCT)")
        set_once: dict[str, Any] | None = None
        if args.set_once:
            # In this process (no Ray yet): the content of the set every run reuses.
            with timer() as tso:
                sres = build(BuildConfig(base=base_uri, aligned=aligned_uri,
                                         out=uri("set-once"), targets=list(TARGETS),
                                         workers=0, progress=False))
            set_once = {"uri": sres.uri, "s": round(tso["s"], 3), "where": "driver"}
            # The tiny pair whose build starts each run's workers, as a job's build does.
            warm_pair = write_pair(root / "warmup-models", TINY, targets=TARGETS)
            print(f"  the alignment set built once in {tso['s']:.1f} s", flush=True)
            release_freed_memory()

        if "raydata" in modes:
            import raydata_sanitize

        torch.set_num_threads(info["cpu_count"] or 1)
        base_out = root / "baseline-out"
        baseline: list[dict[str, Any]] = []
        bmon = ProcessMonitor(pids=[os.getpid()])
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
            on_ray = mode in ("ray", "raydata")
            wk = {"auto": None, "inline": 0, "ray": args.workers, "raydata": None}[mode]
            bwk = {"auto": None, "inline": 0}.get(mode, args.build_workers)
            gpu = use_gpu if on_ray else None
            tag = f"{mode}-n{n}-r{rep}"
            was_up = ray.is_initialized()
            release_freed_memory()  # the baseline's freed heap is not ours
            load_start = [round(x, 2) for x in os.getloadavg()]
            states: list[dict[str, Any]] = []
            actors = 0
            # raydata: no session (the build's workers stop when it returns, leaving the
            # CPUs to Ray Data's own tasks and actors)
            session = (worker_session() if mode != "raydata"
                       else contextlib.nullcontext(None))
            gil: GilSampler | None = None
            with ProcessMonitor() as mon, session as sess:
                with timer() as t:
                    with timer() as tb:
                        # --set-once: a tiny pair's build starts the workers (as the real
                        # build does in a job); the sanitize uses the set built once
                        src = (warm_pair if set_once else
                               {"base": base_uri, "aligned": aligned_uri})
                        bres = build(BuildConfig(
                            base=src["base"], aligned=src["aligned"], out=uri(f"sets/{tag}"),
                            targets=list(TARGETS), workers=bwk, use_gpu=gpu, progress=False))
                    alignment = set_once["uri"] if set_once else bres.uri
                    if args.gil:  # attached before the sanitize's clock starts
                        gil = GilSampler(root / f"gil-{tag}", lambda: [
                            (pid, mon.role_of(pid)) for pid in mon.pids()], python_role,
                            lambda pid: mon.exclude([pid]), rate=args.gil_rate)
                    with (gil or contextlib.nullcontext()), mon.block("sanitize"), \
                            timer() as ts:
                        if mode == "raydata":
                            r = raydata_sanitize.sanitize_raydata(
                                alignment=alignment, adapters=cat_uri[n],
                                out=uri(f"out-{tag}"),
                                threshold=args.threshold, batch_size=args.batch_size,
                                use_gpu=use_gpu, workers_per_gpu=args.workers_per_gpu,
                                task_cpus=args.raydata_task_cpus,
                                holder_cpus=args.raydata_holder_cpus,
                                holder_batch_size=args.raydata_holder_batch,
                                fuse_read=args.raydata_fuse_read, run_id=tag)
                        else:
                            r = sanitize(SanitizeConfig(
                                alignment=alignment, adapters=cat_uri[n],
                                out=uri(f"out-{tag}"),
                                threshold=args.threshold, workers=wk, use_gpu=gpu,
                                batch_size=args.batch_size, max_in_flight=args.max_in_flight,
                                workers_per_gpu=args.workers_per_gpu,
                                run_id=tag, progress=False))
                if sess is not None:  # ask the workers what they hold, before they stop
                    states = worker_states(sess)
                    mon.label(worker_roles(states))
                    actors = len(session_actors(sess))
            assert r.ok == n and r.error == 0, (r.ok, r.error, r.errors[:3])
            if ray.is_initialized() and not was_up:
                ray.shutdown()  # auto started a local Ray for this job (its time is counted)
            workers = max(workers, bres.workers)
            out = uri(f"out-{tag}")
            in_driver = bres.workers == 0 and not actors and mode != "raydata"
            holders = [x for x in states if x["set_bytes"]]
            if in_driver:
                copies, io_workers = 1, 0
            elif holders_design or mode == "raydata":
                copies = len(holders)
                io_workers = sum(1 for x in states if "sanitizer" in x["slots"])
            else:  # the code before 36cc1b4: every sanitize worker loads the set
                copies = io_workers = actors
            per_copy = (max((x["set_bytes"] for x in holders), default=0)
                        if holders_design or mode == "raydata" else None)  # not asked
            rec = {"s": round(t["s"], 3), "build_s": round(tb["s"], 3),
                   "sanitize_s": round(ts["s"], 3), "executor": bres.device
                   if bres.workers == 0 else f"{bres.workers} worker(s)",
                   "loadavg_at_start": load_start,
                   "build": {"workers": bres.workers, "device": bres.device,
                             "stats": bres.stats},
                   "sanitize": {
                       "design": "holders + I/O workers" if holders_design
                       else "one set per worker", "workers": actors, "io_workers": io_workers,
                       # where the alignment set is resident, and how many copies
                       "set_copies": copies,
                       "set_bytes_per_copy": per_copy,
                       "raydata": getattr(r, "raydata", None), "workers_state": states},
                   "ok": r.ok, "projected": r.projected, "out": out,
                   "timings": report_timings(out, tag, args.batch_size),
                   "output_digests": output_digests(out, tag),
                   "memory": mon.summary()}
            # CPU inside the sanitize: every thread of every process (the monitor's own
            # sampling thread left out), per adapter; with --gil, who held the GIL
            cpu = summarize(mon.blocks["sanitize"], n, mon.role_of, [mon.monitor_tid or -1])
            rec.update({"max_thread_cpu_ms_per_adapter": cpu["max_thread_cpu_ms_per_adapter"],
                        "total_cpu_ms_per_adapter": cpu["total_cpu_ms_per_adapter"],
                        "cpu": cpu, "set_once": set_once is not None})
            if gil is not None:
                rec["gil"] = gil.results()
            if mode == "raydata":
                rec["sanitize"]["set_copies"] = rec["sanitize"]["raydata"]["holders"]
            # the next job's memory must not count this one's dying workers
            rec["waited_for_workers_exit_s"] = wait_workers_gone()
            comparison.check_run(out, n, baseline)
            if args.storage == "local" and not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)  # bounded disk at large N
                shutil.rmtree(uri(f"sets/{tag}"), ignore_errors=True)
            if args.io_floor:  # the same catalog's plain I/O, on the same disk, right after
                floor = io_floor(catalogs[n], root / f"io-floor-{tag}")
                floor["sanitize_over_floor"] = round(ts["s"] / floor["s"], 2)
                floor["cpu_ms_per_adapter"] = round(1e3 * floor["cpu_s"] / max(n, 1), 2)
                # The same I/O with each written file dropped from the page cache, as our
                # outputs are: on a VM a fresh page can cost more than the copy into it, so
                # the floor is whichever of the two is faster (the stricter one).
                unc = io_floor(catalogs[n], root / f"io-floor-{tag}", drop_cache=True)
                unc["cpu_ms_per_adapter"] = round(1e3 * unc["cpu_s"] / max(n, 1), 2)
                floor["uncached"] = unc
                floor["sanitize_over_floor_uncached"] = round(ts["s"] / unc["s"], 2)
                floor["sanitize_over_best_floor"] = round(ts["s"] / min(floor["s"], unc["s"]), 2)
                rec["io_floor"] = floor
                rec["io_floor_s"] = floor["s"]
            print(f"  {mode} N={n} run {rep}: {t['s']:.2f} s (build {tb['s']:.2f} s, "
                  f"sanitize {ts['s']:.2f} s; {n / t['s']:.1f} adapters/s; peak RSS "
                  f"{rec['memory']['peak_total_rss'] / MiB:,.0f} MiB; busiest thread "
                  f"{cpu['max_thread_cpu_ms_per_adapter']:.2f} ms/adapter, all "
                  f"{cpu['total_cpu_ms_per_adapter']:.1f} ms/adapter"
                  + (f"; sanitize / I/O floor {rec['io_floor']['sanitize_over_floor']} "
                     f"(uncached floor {rec['io_floor']['sanitize_over_floor_uncached']})"
                     if args.io_floor else "") + ")", flush=True)
            return rec

        if args.warm_workers:
            os.environ[PRELOAD_ENV] = PRELOAD
        try:
            k = 0
            # auto/inline first, each on its own (they expect no Ray running); then the modes
            # on Ray, started once, alternating within each repeat so that a shared
            # machine's drift affects them alike
            groups = [[m] for m in modes if m in ("auto", "inline")]
            groups += [[m for m in modes if m in ("ray", "raydata")]]
            inits: list[float] = []
            for group in [g for g in groups if g]:
                on_ray = group[0] in ("ray", "raydata")
                # Ray Data leaves actors of its own (statistics, autoscaling) in a Ray
                # session: alternating modes get a fresh Ray each
                fresh = on_ray and len(group) > 1
                if on_ray and not fresh:
                    inits.append(start_ray(num_gpus=1 if args.fake_gpu else None))
                for rep in range(args.repeats):
                    for mode in group:
                        if fresh:
                            inits.append(start_ray(num_gpus=1 if args.fake_gpu else None))
                        run_baseline(plan[k])
                        k += 1
                        for n in ns:
                            runs[mode][n].append(one_job(mode, rep, n))
                        if mode == "ray" and rep == args.repeats - 1:
                            startup = (actor_startup_s(args.build_workers, use_gpu)
                                       if not args.smoke else float("nan"))
                        if fresh:
                            ray.shutdown()
                if on_ray and not fresh:
                    ray.shutdown()
            ray_init_s = median(inits)
            check = comparison.summary(baseline)
            if args.no_baseline:
                check = {**check, "equal": None, "skipped": True}
        finally:
            os.environ.pop(PRELOAD_ENV, None)
            if s3 is not None:
                s3.stop()

    per_adapter = median([b["s"] for b in baseline])
    k_base = len(baseline)
    # CPU seconds (user + system, every process): the load-independent cost of each side.
    base_cpu_per_adapter = bmon.summary()["cpu_s"] / k_base if k_base else float("nan")
    rows, results, mem_rows, floor_rows, cpu_rows = [], [], [], [], []
    for mode in modes:
        for n in ns:
            rs = runs[mode][n]
            total = median([r["s"] for r in rs])
            build_s = median([r["build_s"] for r in rs])
            san = median([r["sanitize_s"] for r in rs])
            measured = n <= k_base and args.baseline_per_repeat == 0
            base_t = sum(b["s"] for b in baseline[:n]) if measured else n * per_adapter
            ours_cpu = median([r["memory"]["cpu_s"] for r in rs])
            base_cpu = n * base_cpu_per_adapter
            init = ray_init_s if mode in ("ray", "raydata") else 0.0
            peak = median([r["memory"]["peak_total_rss"] for r in rs])
            peak_anon = median([r["memory"]["peak_total_anon"] for r in rs])
            peak_pss = median([r["memory"].get("peak_total_pss", 0) for r in rs])
            copies = rs[0]["sanitize"]["set_copies"]
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
                "sanitize_adapters_per_s": round(n / san, 3),
                "peak_total_rss_median": int(peak), "peak_total_anon_median": int(peak_anon),
                "peak_total_pss_median": int(peak_pss),
                "set_copies": copies,
                "max_thread_cpu_ms_per_adapter": median(
                    [r["max_thread_cpu_ms_per_adapter"] for r in rs]),
                "total_cpu_ms_per_adapter": median([r["total_cpu_ms_per_adapter"] for r in rs]),
                "runs": rs,
            }
            mid = median_run(rs)
            busiest = (mid["cpu"]["threads"] or [{"role": "-", "name": "-"}])[0]
            cost = mid["memory"]["cost"]
            cpu_rows.append([mode, n, round(san, 2), rec["max_thread_cpu_ms_per_adapter"],
                             f"{busiest['name']} in {busiest['role']}",
                             rec["total_cpu_ms_per_adapter"], mid["cpu"]["monitor_cpu_s"],
                             cost["memory_sampling_s"], cost["thread_sampling_s"]])
            if args.io_floor:
                rec["io_floor_s"] = rec["io_floor_s_median"] = median(
                    [r["io_floor"]["s"] for r in rs])
                rec["sanitize_over_floor_median"] = round(san / rec["io_floor_s_median"], 2)
                rec["io_floor_cpu_ms_per_adapter"] = median(
                    [r["io_floor"]["cpu_ms_per_adapter"] for r in rs])
                rec["io_floor_uncached_s_median"] = median(
                    [r["io_floor"]["uncached"]["s"] for r in rs])
                rec["sanitize_over_best_floor_median"] = round(
                    san / min(rec["io_floor_s_median"], rec["io_floor_uncached_s_median"]), 2)
                floor_rows.append([mode, n, round(san, 2),
                                   round(median([r["io_floor"]["read_s"] for r in rs]), 3),
                                   round(median([r["io_floor"]["write_fsync_s"]
                                                 for r in rs]), 3),
                                   round(rec["io_floor_s_median"], 3),
                                   rec["sanitize_over_floor_median"],
                                   f"{100 / rec['sanitize_over_floor_median']:.0f} %",
                                   rec["io_floor_cpu_ms_per_adapter"],
                                   round(rec["io_floor_uncached_s_median"], 3),
                                   rec["sanitize_over_best_floor_median"]])
            results.append(rec)
            mem_rows.append([mode, n, round(san, 2), rec["sanitize_adapters_per_s"],
                             mib(peak), mib(peak_anon), mib(peak_pss),
                             copies,
                             mib(mid["sanitize"]["set_bytes_per_copy"])
                             if mid["sanitize"]["set_bytes_per_copy"] is not None else "-",
                             mid["sanitize"]["io_workers"] or "-"])
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
        "warm_workers": args.warm_workers, "null_product": args.null_product,
        "fake_gpu": args.fake_gpu, "gil": args.gil, "set_once": set_once,
        "batch_size": args.batch_size, "max_in_flight": args.max_in_flight,
        "workers_per_gpu": args.workers_per_gpu, "repeats": args.repeats,
        "inputs": {k: v for k, v in pair.items() if k not in ("base", "aligned")},
        "ray_init_s": round(ray_init_s, 3), "actor_startup_s": round(startup, 3),
        "baseline": {"adapters_measured": k_base, "per_adapter_s_median": round(per_adapter, 3),
                     "cpu_s_per_adapter": round(base_cpu_per_adapter, 3),
                     "load_s_median": round(median([b["load_s"] for b in baseline]), 3),
                     "compute_write_s_median": round(
                         median([b["compute_write_s"] for b in baseline]), 3),
                     "per_adapter_s": [round(b["s"], 3) for b in baseline],
                     "memory": bmon.summary()},
        "equality": check,
        "outputs_identical_across_modes": {
            n: len({r["output_digests"] for m in modes for r in runs[m][n]}) == 1
            for n in ns},
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }
    last = modes[-1]
    biggest = median_run(runs[last][max(ns)])
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
    emit(result, [
        (f"fleet: {arch.params / 1e6:.0f}M-parameter pair, r={args.rank} q/v adapters, "
         f"{args.storage}, {args.device}; ours = build + sanitize as one job"
         + (", warm workers" if args.warm_workers else "")
         + (", a fake GPU (use_gpu=True, no CUDA)" if args.fake_gpu else "")
         + (", the null product (B copied)" if args.null_product else "")
         + (f"; the set built once ({set_once['s']:.1f} s), each job's build a tiny pair's "
            "(it starts the workers)" if set_once else ""),
         ["mode", "N", "ran on", "build s", "sanitize s", "total s", "ours ad/s",
          f"baseline s{extrap}", "baseline ad/s", "ratio", "ratio incl. ray.init",
          "CPU-s ours", "CPU-s baseline", "CPU-s ratio"], rows),
        ("sanitize alone, and memory of the whole run (medians; RSS summed over every "
         "process at the run's peak moment)",
         ["mode", "N", "sanitize s", "sanitize ad/s", "peak RSS, MiB", "anon RSS, MiB",
          "PSS, MiB", "set copies", "MiB per copy", "I/O workers"], mem_rows),
        *([("sanitize against plain sequential I/O of the same catalog (--io-floor; "
            "target: ratio ≤ 1.25, i.e. ≥ 80 % of the disk)",
            ["mode", "N", "sanitize s", "read s", "write + fsync s", "floor s", "ratio",
             "of the disk", "floor's own CPU, ms / adapter", "uncached floor s",
             "ratio to the faster floor"], floor_rows)] if floor_rows
          else []),
        ("CPU inside the sanitize, every thread of every process (median run; targets: the "
         "busiest thread ≤ 3 ms an adapter, all processes ≤ 30 ms)",
         ["mode", "N", "sanitize s", "busiest thread, ms / adapter", "busiest thread",
          "all processes, ms / adapter", "monitor thread in the sanitize, CPU s",
          "whole job: memory sampling CPU s", "thread sampling CPU s"], cpu_rows),
        *[t for m in modes for t in cpu_tables(m, max(ns), median_run(runs[m][max(ns)]))],
        ("baseline vs ours: equal outputs", ["figure", "value"],
         [["adapters compared", check["adapters_compared"]],
          ["same projected modules", check["same_selection"]],
          ["max |B_ours − B_baseline| / max |B|", f"{check['max_abs_diff_over_max_abs']:.2e}"],
          ["equal", str(check["equal"])],
          ["same bytes in every mode and run, per N",
           str(result["outputs_identical_across_modes"])]]),
        (f"where the time goes (N={max(ns)}, median run)", ["figure", "seconds"], where),
        *[(f"memory and CPU time by process role ({m}, N={max(ns)}, median run)",
           MEMORY_HEADERS, memory_rows(median_run(runs[m][max(ns)])["memory"]))
          for m in modes],
        ("peak RSS and CPU time (baseline, all its adapters, in the driver process)",
         MEMORY_HEADERS, memory_rows(result["baseline"]["memory"])),
    ], args.out_json)
    if check["equal"] is False:
        print("WARNING: the baseline's outputs differ from ours: " + json.dumps(check))
        return 1
    if not all(result["outputs_identical_across_modes"].values()):
        print("WARNING: the modes or runs wrote different bytes: "
              + json.dumps(result["outputs_identical_across_modes"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
