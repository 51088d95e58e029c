"""The build measurement shared by ``bench_build.py`` and ``bench_scale.py``: per repeat, the
raw reads of the build's byte ranges, one worker's reader without compute, then the build.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchlib.floors import evict_page_cache, write_floor
from benchlib.models import target_refs
from benchlib.monitor import MEMORY_HEADERS, ProcessMonitor, memory_rows
from benchlib.runs import gbps, median, timer
from benchlib.runtime import pipeline


def raw_read_s(refs: Sequence[Any], base_uri: str, aligned_uri: str, threads: int) -> dict:
    """Time reading exactly the build's target byte ranges with the same Storage class
    (``read_into`` into reused buffers), with ``threads`` concurrent readers (1 = sequential).
    """

    from safelora_ray.storage import open_storage

    storages = {base_uri: open_storage(base_uri), aligned_uri: open_storage(aligned_uri)}
    biggest = max(r.nbytes for r in refs)
    local = threading.local()

    def read(ref: Any) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(biggest)
        storages[ref.uri].read_into(ref.path, ref.start, memoryview(buf)[: ref.nbytes])
        return ref.nbytes

    t0 = time.perf_counter()
    if threads <= 1:
        total = sum(read(r) for r in refs)
    else:
        with cf.ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, refs))
    dt = time.perf_counter() - t0
    counted = sum(s.bytes_read for s in storages.values())
    assert counted == total, (counted, total)
    return {"threads": threads, "bytes": total, "s": round(dt, 4), "gbps": gbps(total, dt)}


def reader_ceiling_s(base_uri: str, aligned_uri: str, targets: Sequence[str],
                     scratch: str) -> dict:
    """One build worker's reader with no compute: its prefetch thread (ranged reads of base and
    aligned in two threads into reused buffers, then their source digest hashed in parallel
    chunks) over every target module, each released once taken, as the build does after
    computing it. The most one worker can feed its device; a GPU build
    is bounded by it."""
    from safelora_ray.formats.checkpoint import Checkpoint
    from safelora_ray.planning.plan import plan_build

    ShardBuilder = pipeline("build").ShardBuilder

    plan = plan_build(Checkpoint.open(base_uri), Checkpoint.open(aligned_uri), list(targets))
    files = plan.shards[0]  # one worker: the whole plan
    builder = ShardBuilder(files, scratch, "cpu")
    modules = getattr(builder, "_modules", None)
    release = getattr(builder, "release", None)
    if modules is None or release is None:  # the build changed: nothing to measure
        return {"s": None, "gbps": None}
    t0 = time.perf_counter()
    try:
        for i in range(len(files)):
            for item in modules(i):
                release(item)
    finally:
        builder.close()
    dt = time.perf_counter() - t0
    return {"bytes": plan.input_bytes, "s": round(dt, 4), "gbps": gbps(plan.input_bytes, dt)}


def measure_build(*, base_uri: str, aligned_uri: str, out_uri: Callable[[int], str],
                  targets: Sequence[str], workers: int | None, use_gpu: bool, repeats: int,
                  read_threads: int, cold_files: Sequence[Path] | None = None,
                  build_kwargs: dict[str, Any] | None = None) -> dict:
    """Per repeat: raw sequential read, raw threaded read, then the build, of the same bytes.

    With ``cold_files`` the files' cached pages are dropped before each of the three.
    ``build_kwargs``: more BuildConfig fields (``projection``, ``energy``...).
    """
    build, BuildConfig = pipeline("build").build, pipeline("build").BuildConfig

    refs = target_refs(base_uri, aligned_uri, targets)
    target_bytes = sum(r.nbytes for r in refs)
    runs = []
    for rep in range(repeats):
        rec: dict[str, Any] = {"repeat": rep}
        for key, threads in (("raw_seq", 1), ("raw_threads", read_threads)):
            if cold_files:
                evict_page_cache(cold_files)
            rec[key] = raw_read_s(refs, base_uri, aligned_uri, threads)
        if cold_files:
            evict_page_cache(cold_files)
        with tempfile.TemporaryDirectory(prefix="bench-scratch-") as scratch:
            rec["reader_ceiling"] = reader_ceiling_s(base_uri, aligned_uri, targets, scratch)
        if cold_files:
            evict_page_cache(cold_files)
        with ProcessMonitor() as mon, timer() as t:
            res = build(BuildConfig(base=base_uri, aligned=aligned_uri, out=out_uri(rep),
                                    targets=list(targets), workers=workers, use_gpu=use_gpu,
                                    progress=False, **(build_kwargs or {})))
        assert res.source_bytes == target_bytes, (res.source_bytes, target_bytes)
        rec.update({
            "build_s": round(t["s"], 3), "build_duration_s": round(res.duration_s, 3),
            "bytes_read": res.bytes_read, "read_ratio": round(res.bytes_read / target_bytes, 5),
            "build_gbps": gbps(target_bytes, t["s"]), "workers": res.workers,
            "device": res.device, "stats": {k: round(v, 3) for k, v in res.stats.items()},
            "num_modules": res.num_modules, "memory": mon.summary(),
            "stored_bytes": res.stored_bytes,
        })
        # The build's fixed cost: from the call to its first module read (planning, starting
        # the workers: the actor's start-up on Ray); None from code that does not report it.
        startup = res.stats.get("startup_s")
        rec["startup_s"] = round(startup, 3) if startup is not None else None
        rec["startup_share"] = (round(startup / t["s"], 3)
                                if startup is not None and t["s"] > 0 else None)
        best_raw = min(rec["raw_seq"]["s"], rec["raw_threads"]["s"])
        rec["build_over_raw"] = round(t["s"] / best_raw, 2) if best_raw > 0 else None
        out = out_uri(rep)
        if "://" not in out:  # a local set: write + fsync its bytes with plain sequential I/O
            sizes = [f.stat().st_size for f in sorted(Path(out).rglob("*")) if f.is_file()]
            # A 70B set (~22 GB) and its floor do not both fit beside the pair on a 64 GB
            # disk: then the set (checked by the build itself) goes first.
            if shutil.disk_usage(Path(out).parent).free < 1.2 * sum(sizes):
                shutil.rmtree(out, ignore_errors=True)
                rec["set_removed_before_write_floor"] = True
            rec["raw_write"] = write_floor(sizes, Path(out).parent / f".write-floor-{rep}")
            floor = max(best_raw, rec["raw_write"]["s"])
            rec["build_over_floor"] = round(t["s"] / floor, 2) if floor > 0 else None
            rec["build_over_max_read_write"] = rec["build_over_floor"]
        runs.append(rec)
        print(f"  repeat {rep}: build {t['s']:.2f} s ({rec['build_gbps']} GB/s), raw read "
              f"{rec['raw_seq']['s']:.2f} s seq / {rec['raw_threads']['s']:.2f} s "
              f"x{read_threads}, bytes read / target = {rec['read_ratio']}", flush=True)
    mid = sorted(runs, key=lambda r: r["build_s"])[len(runs) // 2]
    summary = {
        "target_bytes": target_bytes,
        "num_modules": runs[0]["num_modules"],
        "bytes_read": runs[0]["bytes_read"],
        "read_ratio": runs[0]["read_ratio"],
        "build_s_median": median([r["build_s"] for r in runs]),
        "raw_seq_s_median": median([r["raw_seq"]["s"] for r in runs]),
        "raw_threads_s_median": median([r["raw_threads"]["s"] for r in runs]),
        "reader_ceiling_s_median": median([r["reader_ceiling"]["s"] or float("nan")
                                           for r in runs]),
        "read_threads": read_threads,
        "median_run": mid["repeat"],
        "workers": mid["workers"],
        "device": mid["device"],
        "startup_s_median": median([r["startup_s"] for r in runs
                                    if r["startup_s"] is not None]),
        "startup_share_median": median([r["startup_share"] for r in runs
                                        if r["startup_share"] is not None]),
    }
    summary["build_gbps_median"] = gbps(target_bytes, summary["build_s_median"])
    summary["raw_seq_gbps_median"] = gbps(target_bytes, summary["raw_seq_s_median"])
    summary["raw_threads_gbps_median"] = gbps(target_bytes, summary["raw_threads_s_median"])
    summary["reader_ceiling_gbps_median"] = gbps(target_bytes,
                                                 summary["reader_ceiling_s_median"])
    best = min(summary["raw_seq_s_median"], summary["raw_threads_s_median"])
    summary["build_over_raw_median"] = round(summary["build_s_median"] / best, 2)
    if all("raw_write" in r for r in runs):
        # The bound: build ≤ 1.25 x max(read the target bytes, write the set's bytes)
        summary["set_bytes"] = runs[0]["raw_write"]["bytes"]
        summary["raw_write_s_median"] = median([r["raw_write"]["s"] for r in runs])
        summary["raw_write_gbps_median"] = gbps(summary["set_bytes"],
                                                summary["raw_write_s_median"])
        floor = max(best, summary["raw_write_s_median"])
        summary["build_over_floor_median"] = round(summary["build_s_median"] / floor, 2)
        summary["build_over_max_read_write"] = summary["build_over_floor_median"]
    return {"summary": summary, "runs": runs}


def build_tables(m: dict, arch_line: str) -> list[tuple[str, list[str], list[list[Any]]]]:
    s = m["summary"]
    runs = m["runs"]
    mid = next(r for r in runs if r["repeat"] == s["median_run"])
    main = [
        ["target tensor bytes (base + aligned)", f"{s['target_bytes']:,}"],
        ["target modules", s["num_modules"]],
        ["bytes read by the build", f"{s['bytes_read']:,}"],
        ["bytes read / target bytes", f"{s['read_ratio']:.4f}"],
        ["raw read, sequential (s, GB/s)",
         f"{s['raw_seq_s_median']:.3f} s, {s['raw_seq_gbps_median']} GB/s"],
        [f"raw read, {s['read_threads']} threads (s, GB/s)",
         f"{s['raw_threads_s_median']:.3f} s, {s['raw_threads_gbps_median']} GB/s"],
        ["one worker's reader loop, no compute (read + source digest; s, GB/s)",
         f"{s['reader_ceiling_s_median']:.3f} s, {s['reader_ceiling_gbps_median']} GB/s"],
        ["build wall time (s, GB/s of target bytes)",
         f"{s['build_s_median']:.3f} s, {s['build_gbps_median']} GB/s"],
        ["build time / best raw read time", f"{s['build_over_raw_median']:.2f}"],
        ["start-up: build call to first module read (s, share of the build)",
         f"{s['startup_s_median']:.3f} s, {s['startup_share_median']:.1%}"],
        *([["set bytes written + fsynced, plain sequential (s, GB/s)",
            f"{s['raw_write_s_median']:.3f} s, {s['raw_write_gbps_median']} GB/s "
            f"({s['set_bytes']:,} bytes)"],
           ["build time / max(best raw read, raw write) (target ≤ 1.25)",
            f"{s['build_over_floor_median']:.2f}"]] if "build_over_floor_median" in s else []),
        ["repeats (median reported)", len(runs)],
    ]
    st = mid["stats"]
    w = max(1, mid["workers"])
    where = [
        ["workers x device", f"{mid['workers']} x {mid['device']}"],
        ["read_s (sum over workers; overlapped with compute)", st.get("read_s")],
        ["compute_s (sum over workers)", st.get("compute_s")],
        ["write_s (sum over workers)", st.get("write_s")],
        ["(compute_s + write_s) / workers", round((st.get("compute_s", 0)
                                                   + st.get("write_s", 0)) / w, 3)],
        ["build wall time (median run)", mid["build_s"]],
    ]
    return [
        (f"build: {arch_line}", ["figure", "value"], main),
        ("where the time goes (median run)", ["figure", "seconds"], where),
        ("peak RSS and CPU time by process role (median run)", MEMORY_HEADERS,
         memory_rows(mid["memory"])),
    ]


#: Where ``--modes`` runs the build: ``auto`` is the product's default on a machine with no
#: cluster (``workers=None``, no Ray started beforehand: the rule of
#: ``safelora_ray.execution.resolve`` decides), ``inprocess`` forces this process
#: (``workers=0``), ``ray`` starts a local Ray first and builds on its worker actors (what the
#: rule before issue 22 chose for a big build or a local GPU).
BUILD_MODES = ("auto", "inprocess", "ray")


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in BUILD_MODES]
    if bad or not modes:
        raise SystemExit(f"--modes: choose among {', '.join(BUILD_MODES)} (got {text!r})")
    return modes


def measure_build_mode(mode: str, *, workers: int | None, use_gpu: bool, smoke: bool,
                       **kwargs: Any) -> dict:
    """:func:`measure_build` in one of :data:`BUILD_MODES`; with the Ray start (``ray``) and
    the actor start-up probe, and whether the build left a Ray running (``auto``)."""
    import ray

    from benchlib.runtime import actor_startup_s, start_ray

    ray_init_s = probe_s = float("nan")
    if ray.is_initialized():
        ray.shutdown()  # each mode starts from a process with no Ray
    if mode == "ray":
        ray_init_s = start_ray()
    m = measure_build(workers={"auto": None, "inprocess": 0}.get(mode, workers),
                      use_gpu=use_gpu, **kwargs)
    ray_up = ray.is_initialized()
    if mode == "ray" and not smoke:
        probe_s = actor_startup_s(m["summary"]["workers"] or None, use_gpu)
    if ray_up:
        ray.shutdown()
    return {"mode": mode, "ray_started_by_build": ray_up and mode != "ray",
            "ray_init_s": round(ray_init_s, 3), "actor_startup_s": round(probe_s, 3), **m}


def modes_table(results: dict[str, dict]) -> tuple[str, list[str], list[list[Any]]]:
    """One row per mode: where it ran, the build, its start-up share, and the issue's bound."""
    rows = []
    for mode, r in results.items():
        s = r["summary"]
        rows.append([mode, f"{s['workers']} x {s['device']}", s["build_s_median"],
                     s["startup_s_median"], f"{s['startup_share_median']:.1%}",
                     r["actor_startup_s"], r["ray_init_s"],
                     s.get("build_over_max_read_write")])
    return ("the build by mode (medians; ray: Ray started beforehand, its start not counted)",
            ["mode", "workers x device", "build s", "start-up s (call → first read)",
             "start-up share", "actor start-up probe s", "ray.init s",
             "build / max(read, write)"], rows)
