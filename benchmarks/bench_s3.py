"""Benchmark: sanitize s3:// → s3:// on a real S3 server (SeaweedFS on loopback, started
here) against the plain-boto3 floor of the same objects, measured in the same run.

Inputs: a Llama-shaped pair (``--arch``) whose alignment set is built once onto S3, and a
catalog of ``--n`` PEFT LoRA adapters (r = 8 on q_proj and v_proj) uploaded to S3.

- **floor**: boto3, ``--floor-threads`` threads (16) sharing one client: GET every object of
  the catalog and PUT the same bytes to as many keys (what a sanitize cannot avoid moving);
- **sanitize**: ``sanitize(s3 set, s3 catalog → s3 out)`` in each of ``--modes``
  (``inline``: ``workers=0``; ``auto``: the product's default, which on one machine with no
  cluster starts a private local Ray inside the run; ``ray``: a local Ray started before the
  clock, as a cluster is), a fresh output each repeat;
  the ratio sanitize / floor is the issue's figure (≤ 2);
- **set cache**: the set on S3 is copied to the node's disk by the first run that needs it
  (``SAFELORA_SET_CACHE``, here under the workdir) and mapped from there by every run after
  it; ``--set-cache warm`` (default) makes and maps the copy before the clock, as a nightly
  run finds it after the run before (on disk, its pages in the page cache), ``cold`` removes
  it before each sanitize (the copy counted, and a second floor taken that also GETs the
  set's objects in 16 MiB ranges, the bytes a node's first run moves besides), ``off``
  turns it off;
- **bracket**: the floor (and in ``cold``, the floor with the set's GETs) is taken again
  after each repeat's sanitizes, and each run is also held to the mean of the two (on this
  shared machine the same floor took 14-22 s within the hour); ``--no-bracket``: only before;
- **settle**: before the floor and before each sanitize, the benchmark waits until the
  machine is quiet (``--settle``: under 0.25 cores busy for two seconds running): SeaweedFS
  digests a burst of writes for a while after it, and the phase that came next paid for it;
- **server volumes**: SeaweedFS's growth (7 volumes at a time) and 4 GiB volumes by default
  (``--volume-size-mb``, ``--volumes-per-growth``; smaller where half the disk's free space
  would not hold a growth step): the bucket's first write makes room for every phase of a
  run, so no phase waits on the master growing volumes. The tests' fixture makes 64 MiB
  volumes one at a time (hundreds of small buckets); with it, every 64 MiB written stalls the
  PUT that fills a volume ~0.2 s (no CPU spent anywhere), which no production store does and
  which a batch's PUTs wait on more than the floor's 16 independent threads
  (docs/benchmarks.md §15.11). SeaweedFS's own default size, 30 GB, is more than this
  machine's disk holds seven of;
- **list**: the listing of the catalog alone (``iter_catalog``), so its share is visible;
- **requests**: every S3 call the product's clients make in this process, by operation (an
  ``inline`` run's are all of them: a deterministic measure, where the times are noisy), per
  adapter, against the floor's 2 (a GET and a PUT per object);
- **CPU**: seconds of CPU spent during the floor and each sanitize by this process (the
  client: all of an ``inline`` run's work), by the S3 server, and by the whole machine (Ray's
  workers included): on a small machine shared by the server, whose they are says what a
  change can still win.

``--arch 7b --layers L --null-product``: Llama-2-7B-shaped adapters (d = 4096, r = 8 on q/v;
``L`` of its 32 layers, so that the set's build fits a small machine) with the device's
product replaced by a copy of B (``SAFELORA_BENCH_NULL_PRODUCT=1``, as ``bench_fleet.py
--null-product``): what is left is the I/O against its floor.

Also the build's reader stage from S3: every target tensor of the pair read by the product's
storage (``S3Storage.read_into``) against plain boto3 ranged GETs of the same byte ranges at
the same concurrency (``--read-threads``).

Example::

    python benchmarks/bench_s3.py --n 600 --repeats 2 \\
        --out-json benchmarks/results/issue23/s3-600.json
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib.models import FLEET_100M, LLAMA2_7B, TINY, write_adapters, write_pair
from benchlib.runs import (
    common_args,
    emit,
    machine_info,
    median,
    mib,
    setup_logging,
    workdir,
)
from benchlib.runtime import start_ray
from benchlib.s3 import SeaweedS3

ARCHS = {"tiny": TINY, "100m": FLEET_100M, "7b": LLAMA2_7B}
NULL_PRODUCT_ENV = "SAFELORA_BENCH_NULL_PRODUCT"


class RequestCounter:
    """Counts every call the product's S3 clients make in this process, by operation (one per
    call, whatever its retries: botocore's ``before-parameter-build``)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def install(self) -> None:
        import safelora_ray.storage.s3 as s3mod

        make = s3mod._new_client

        def counted() -> Any:
            client = make()
            client.meta.events.register("before-parameter-build.s3", self._seen)
            return client

        s3mod._new_client = counted

    def _seen(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.counts[model.name] += 1

    def take(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counts)
            self.counts.clear()
        return out


class CpuClock:
    """CPU seconds spent, between two reads: by this process (all its threads), by the S3
    server's process, and by the whole machine (every core: Ray's workers included). Where a
    2-core machine is saturated, the wall time follows the sum; the split says whose it is."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def read(self) -> dict[str, float]:
        t = os.times()
        out = {"client": t.user + t.system, "server": 0.0, "machine": 0.0}
        if self.server_pid:
            with open(f"/proc/{self.server_pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            out["server"] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        out["machine"] = (sum(cpu) - cpu[3] - cpu[4]) / self._tick  # all but idle + iowait
        return out

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: round(after[k] - before[k], 2) for k in before}

    def settle(self, below: float, window: float = 1.0, timeout: float = 120.0) -> float:
        """Wait until the machine is quiet: under ``below`` cores busy over two windows in a
        row (0 turns it off). Returns the seconds waited.

        SeaweedFS keeps working for a while after a burst of writes (measured: the first
        sanitize after the floor's 2.5 GB of PUTs met a server spending a third more CPU
        than the second one, docs/benchmarks.md §15.3); without this, whichever phase runs
        first after another pays for the one before."""
        t0 = time.perf_counter()
        if below <= 0:
            return 0.0
        quiet = 0
        prev = self.read()["machine"]
        while quiet < 2 and time.perf_counter() - t0 < timeout:
            time.sleep(window)
            now = self.read()["machine"]
            quiet = quiet + 1 if (now - prev) / window < below else 0
            prev = now
        return round(time.perf_counter() - t0, 1)


def upload_parallel(s3: SeaweedS3, local: Path, prefix: str, threads: int = 16) -> list[str]:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    keys = [f"{prefix}/{f.relative_to(local).as_posix()}" for f in files]
    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda fk: s3.client.put_object(Bucket=s3.bucket, Key=fk[1],
                                                      Body=fk[0].read_bytes()),
                      zip(files, keys, strict=True)))
    return keys


def s3_floor(s3: SeaweedS3, keys: list[str], dest: str, threads: int,
             clock: CpuClock, gets: list[tuple[str, int, int]] | None = None) -> dict[str, Any]:
    """GET every key and PUT its bytes under ``dest``, ``threads`` at a time, one client;
    first, in the same pool, ranged GETs of ``gets`` (key, start, length) whose bytes are
    only read (a node's first run's copy of the set)."""
    c = s3.client
    cpu0 = clock.read()

    def one(key: str) -> int:
        body = c.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        c.put_object(Bucket=s3.bucket, Key=f"{dest}/{key}", Body=body)
        return len(body)

    def part(r: tuple[str, int, int]) -> int:
        key, start, n = r
        return len(c.get_object(Bucket=s3.bucket, Key=key,
                                Range=f"bytes={start}-{start + n - 1}")["Body"].read())

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        got = [pool.submit(part, r) for r in gets or []]
        total = sum(pool.map(one, keys)) + sum(f.result() for f in got)
    s = time.perf_counter() - t0
    return {"objects": len(keys), "bytes": total, "s": s, "threads": threads,
            "cpu_s": CpuClock.spent(cpu0, clock.read())}


def set_parts(s3: SeaweedS3, prefix: str, part: int = 16 * 2**20) -> list[tuple[str, int, int]]:
    """The set's objects under ``prefix`` cut into ``part``-sized ranges."""
    out = []
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket,
                                                                     Prefix=f"{prefix}/"):
        for o in page.get("Contents", []):
            out += [(o["Key"], off, min(part, o["Size"] - off))
                    for off in range(0, o["Size"], part)]
    return out


def target_ranges(uri: str) -> list[tuple[str, int, int]]:
    """(file, start, length) of every target tensor of the checkpoint at ``uri``."""
    from safelora_ray.formats.safetensors.read import read_header
    from safelora_ray.storage import open_storage

    st = open_storage(uri)
    out = []
    for o in st.list():
        if not o.path.endswith(".safetensors"):
            continue
        hdr = read_header(st, o.path)
        for name, info in hdr.tensors.items():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                out.append((o.path, info.start, info.nbytes))
    return out


def reader_stage(s3: SeaweedS3, prefix: str, threads: int) -> dict[str, Any]:
    """Product reads (``S3Storage.read_into``) vs plain boto3 ranged GETs of the same ranges."""
    from safelora_ray.storage import open_storage

    uri = s3.uri(prefix)
    ranges = target_ranges(uri)
    st = open_storage(uri)
    key0 = f"{prefix}/"

    def ours(r: tuple[str, int, int]) -> int:
        buf = bytearray(r[2])
        st.read_into(r[0], r[1], memoryview(buf))
        return r[2]

    def plain(r: tuple[str, int, int]) -> int:
        rng = f"bytes={r[1]}-{r[1] + r[2] - 1}"
        return len(s3.client.get_object(Bucket=s3.bucket, Key=key0 + r[0],
                                        Range=rng)["Body"].read())

    res: dict[str, Any] = {"ranges": len(ranges), "bytes": sum(r[2] for r in ranges)}
    for name, fn in (("plain", plain), ("ours", ours), ("plain2", plain), ("ours2", ours)):
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as pool:
            assert sum(pool.map(fn, ranges)) == res["bytes"]
        res[f"{name}_s"] = time.perf_counter() - t0
    res["ratio"] = min(res["ours_s"], res["ours2_s"]) / min(res["plain_s"], res["plain2_s"])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, storage=False)
    p.add_argument("--n", type=int, default=600, help="adapters in the catalog")
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--modes", default="inline,auto",
                   help="inline (workers=0), auto (the product's choice: here a private local "
                        "Ray, its start counted), ray (Ray started before the clock, as a "
                        "cluster a fleet runs on is)")
    p.add_argument("--threshold", type=float, default=0.35)
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="batches per worker (default: the product's, 3 on S3)")
    p.add_argument("--floor-threads", type=int, default=16)
    p.add_argument("--read-threads", type=int, default=8)
    p.add_argument("--reader-arch", choices=sorted(ARCHS), default="100m")
    p.add_argument("--no-reader", action="store_true", help="skip the reader stage")
    p.add_argument("--layers", type=int, default=None, help="override the arch's layer count")
    p.add_argument("--null-product", action="store_true",
                   help=f"replace the product by a copy of B ({NULL_PRODUCT_ENV}=1)")
    p.add_argument("--set-cache", choices=("warm", "cold", "off"), default="warm",
                   help="the node's copy of the S3 set (SAFELORA_SET_CACHE, here under the "
                        "workdir): warm = made and mapped before the clock, as a run after "
                        "another finds it; cold = removed before each sanitize (its copy "
                        "counted); off = none (the set read from S3 into memory)")
    p.add_argument("--no-bracket", dest="bracket", action="store_false",
                   help="do not take the floor(s) again after each repeat's sanitizes")
    p.add_argument("--volume-size-mb", type=int, default=4096,
                   help="the server's volume size limit (the tests' fixture: 64)")
    p.add_argument("--volumes-per-growth", type=int, default=7,
                   help="volumes the server makes at once when it needs one (SeaweedFS's "
                        "default 7; the tests' fixture: 1)")
    p.add_argument("--settle", type=float, default=0.25,
                   help="before each timed phase, wait until under this many cores are busy "
                        "(the server done with the last one's writes; 0: do not wait)")
    args = p.parse_args(argv)
    if args.volume_size_mb < 1 or args.volumes_per_growth < 1:
        p.error("--volume-size-mb and --volumes-per-growth must be at least 1")
    setup_logging()
    if args.smoke:
        args.n, args.repeats, args.reader_arch = 8, 1, "tiny"
    arch = ARCHS[args.arch]
    if args.layers:
        arch = dataclasses.replace(arch, layers=args.layers)
    if args.null_product:  # read when the product's modules are imported: set it first
        os.environ[NULL_PRODUCT_ENV] = "1"
    import ray

    from safelora_ray import BuildConfig, SanitizeConfig, build, sanitize
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.sanitize.shared_set import SharedSet
    from safelora_ray.planning.catalog import iter_catalog

    counter = RequestCounter()
    counter.install()

    with workdir(args.workdir, args.keep, "bench-s3-") as root:
        cache_dir = root / "set-cache"  # before Ray starts: its workers inherit it
        os.environ["SAFELORA_SET_CACHE"] = "off" if args.set_cache == "off" else str(cache_dir)
        # A growth step's volumes must fit the disk (half its free space), else the server
        # refuses writes ("no free volumes left"): smaller volumes on a small disk.
        free_mb = shutil.disk_usage(root).free // 2**20
        fit = max(64, free_mb // (2 * args.volumes_per_growth))
        if fit < args.volume_size_mb:
            print(f"note: {free_mb} MiB free in {root}: volumes of {fit} MiB, not "
                  f"{args.volume_size_mb}", file=sys.stderr)
            args.volume_size_mb = fit
        s3 = SeaweedS3(root, volume_size_mb=args.volume_size_mb,
                       volumes_per_growth=args.volumes_per_growth)
        try:
            # A 7B-shaped pair's other tensors are sparse holes: only q/v are read or built.
            pair = write_pair(root / "pair", arch, fill="holes" if args.arch == "7b" else "dense")
            t0 = time.perf_counter()
            aset = build(BuildConfig(base=pair["base"], aligned=pair["aligned"],
                                     out=s3.uri("set"), workers=0, progress=False)).uri
            build_s = time.perf_counter() - t0
            write_adapters(root / "cat", arch, args.n)
            keys = upload_parallel(s3, root / "cat", "cat")
            cat = s3.uri("cat")
            nbytes = sum(p.stat().st_size for p in (root / "cat").rglob("*") if p.is_file())
            runs: list[dict[str, Any]] = []
            clock = CpuClock(s3.weed.pid)

            def floors(tag: str) -> tuple[dict[str, Any], dict[str, Any] | None, float]:
                """The floor, and for a node's first run the floor that also moves the set's
                bytes; each from a quiet machine. Returns them and the first settle's s."""
                settled = clock.settle(args.settle)
                floor = s3_floor(s3, keys, f"floor{tag}", args.floor_threads, clock)
                floor_set = None
                if args.set_cache == "cold":
                    clock.settle(args.settle)
                    floor_set = s3_floor(s3, keys, f"floorset{tag}", args.floor_threads,
                                         clock, gets=set_parts(s3, "set"))
                return floor, floor_set, settled

            for rep in range(args.repeats):
                # A node's first run also moves the set: the floor of those bytes too.
                floor, floor_set, floor_settle_s = floors(f"-{rep}")
                t0 = time.perf_counter()
                listed = sum(1 for _ in iter_catalog(cat))
                list_s = time.perf_counter() - t0
                assert listed == args.n
                for mode in args.modes.split(","):
                    # ray: a running Ray, as on a cluster (started before the clock); auto:
                    # the product's choice with none configured (here: a private local Ray
                    # that the run starts, counted)
                    ray_init_s = start_ray() if mode == "ray" else None
                    shutil.rmtree(cache_dir, ignore_errors=True)
                    if args.set_cache == "warm":  # as a run before this one left it: on
                        # disk and, mapped by that run, in the page cache
                        SharedSet.map_local(AlignmentSet.open(aset))
                    settle_s = clock.settle(args.settle)
                    counter.take()
                    cpu0 = clock.read()
                    t0 = time.perf_counter()
                    try:
                        r = sanitize(SanitizeConfig(
                            alignment=aset, adapters=cat, out=s3.uri(f"out-{mode}-{rep}"),
                            threshold=args.threshold, workers=0 if mode == "inline" else None,
                            progress=False,
                            # only when given: code before the default became None refuses it
                            **({"max_in_flight": args.max_in_flight}
                               if args.max_in_flight is not None else {})))
                    finally:
                        if ray.is_initialized():  # ray, or auto's private Ray: none stays on
                            ray.shutdown()
                    s = time.perf_counter() - t0
                    cpu = CpuClock.spent(cpu0, clock.read())
                    calls = counter.take()  # this process's: all of an inline run's
                    assert r.ok == args.n and r.error == 0, (r.ok, r.error, r.errors[:3])
                    runs.append({"rep": rep, "mode": mode, "sanitize_s": s,
                                 "floor_s": floor["s"], "ratio": s / floor["s"],
                                 "floor_fraction": floor["s"] / s,
                                 "floor_with_set_s": floor_set and floor_set["s"],
                                 "floor_with_set_fraction": floor_set and floor_set["s"] / s,
                                 "list_s": list_s, "per_adapter_ms": 1e3 * s / args.n,
                                 "settle_s": settle_s, "floor_settle_s": floor_settle_s,
                                 "ray_init_s": ray_init_s,
                                 "cpu_s": cpu, "floor_cpu_s": floor["cpu_s"],
                                 "requests": calls if mode == "inline" else None,
                                 "requests_per_adapter": (sum(calls.values()) / args.n
                                                          if mode == "inline" else None)})
                if args.bracket:
                    # The floor again after the rep's sanitizes: on a shared machine the same
                    # requests took 14-22 s within the hour (§15.11), so each run is also held
                    # to the mean of the floors either side of it.
                    after, after_set, _ = floors(f"-after-{rep}")
                    for r in runs:
                        if r["rep"] != rep:
                            continue
                        mean = (floor["s"] + after["s"]) / 2
                        r.update(floor_after_s=after["s"], floor_after_cpu_s=after["cpu_s"],
                                 floor_mean_fraction=mean / r["sanitize_s"])
                        if floor_set is not None and after_set is not None:
                            mean_set = (floor_set["s"] + after_set["s"]) / 2
                            r.update(floor_with_set_after_s=after_set["s"],
                                     floor_with_set_mean_fraction=mean_set / r["sanitize_s"])
            reader: dict[str, Any] | None = None
            if not args.no_reader:
                reader_pair = (pair if args.reader_arch == args.arch
                               else write_pair(root / "rpair", ARCHS[args.reader_arch]))
                upload_parallel(s3, Path(reader_pair["base"]), "rbase")
                reader = reader_stage(s3, "rbase", args.read_threads)
        finally:
            s3.stop()
    modes = args.modes.split(",")
    summary = {m: {"sanitize_s_median": median([r["sanitize_s"] for r in runs
                                                if r["mode"] == m]),
                   "ratio_median": median([r["ratio"] for r in runs if r["mode"] == m])}
               for m in modes}
    result = {"machine": machine_info(), "server": "seaweedfs 4.48 (loopback)",
              "server_volumes": {"size_mb": args.volume_size_mb,
                                 "per_growth": args.volumes_per_growth},
              "n": args.n, "arch": args.arch, "layers": arch.layers,
              "null_product": args.null_product, "catalog_bytes": nbytes, "objects": len(keys),
              "build_s": build_s, "floor_threads": args.floor_threads,
              "settle_below_cores": args.settle, "set_cache": args.set_cache, "runs": runs,
              "summary": summary, "reader": reader, "command": " ".join(sys.argv)}
    rows = [[r["rep"], r["mode"], f"{r['floor_settle_s']:.0f} / {r['settle_s']:.0f}",
             f"{r['sanitize_s']:.2f}", f"{r['floor_s']:.2f}",
             f"{r['ratio']:.2f}", f"{100 * r['floor_fraction']:.0f} %",
             "-" if r.get("floor_after_s") is None
             else f"{r['floor_after_s']:.2f} s, {100 * r['floor_mean_fraction']:.0f} %",
             "-" if r["floor_with_set_s"] is None
             else f"{r['floor_with_set_s']:.2f} s, {100 * r['floor_with_set_fraction']:.0f} %"
             + ("" if r.get("floor_with_set_mean_fraction") is None
                else f" (mean of both sides: {100 * r['floor_with_set_mean_fraction']:.0f} %)"),
             f"{r['list_s']:.2f}",
             f"{r['per_adapter_ms']:.1f}",
             "/".join(f"{r['floor_cpu_s'][k]:.1f}" for k in ("client", "server", "machine")),
             "/".join(f"{r['cpu_s'][k]:.1f}" for k in ("client", "server", "machine")),
             "-" if r["requests"] is None else f"{r['requests_per_adapter']:.2f} "
             + str(dict(sorted(r["requests"].items())))] for r in runs]
    tables = [("sanitize s3 → s3 vs the GET+PUT floor",
               ["rep", "mode", "settled s (floor / ours)", "sanitize s", "floor s", "ratio",
                "floor/ours", "floor after: s, mean floor/ours",
                "floor with the set's GETs (cold): s, floor/ours", "list s",
                "ms/adapter", "floor CPU s (client/server/machine)",
                "CPU s (client/server/machine)", "requests/adapter (inline: all, by op)"],
               rows)]
    if reader is not None:
        tables.append(("reader stage vs plain ranged GETs",
                       ["ranges", "MiB", "plain s", "ours s", "ratio"],
                       [[reader["ranges"], f"{mib(reader['bytes']):.0f}",
                         f"{reader['plain_s']:.2f}", f"{reader['ours_s']:.2f}",
                         f"{reader['ratio']:.2f}"]]))
    emit(result, tables, args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
