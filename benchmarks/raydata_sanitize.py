"""Benchmark only (not product code): safelora-ray's sanitize as a Ray Data pipeline, to
compare Ray Data's streaming executor with the product's own (``safelora_ray.execution`` +
``safelora_ray.pipelines.sanitize.driver``) on the same work.

The pipeline, one adapter per row::

    from_items(adapter refs)
      → map_batches(read_stage)          CPU tasks: ledger, read, validate (the product's
                                         FleetSanitizer helpers)
      → map_batches(Holder)              an actor pool holding the alignment set (one actor per
                                         GPU x --workers-per-gpu, or one per node on CPU):
                                         C B and the score sums of a batch, one product per
                                         module (the product's ProjectionEngine and
                                         FleetSanitizer._project_all)
      → map_batches(write_stage)         CPU tasks: select, write, ledger record
                                         (FleetSanitizer._finish)
      → rows streamed into the product's ReportWriter in the driver

Everything numeric and every write is the product's own code, so the outputs are the same
bytes (``--check`` asserts it on a small catalog, a corrupt adapter included). What differs
is the execution: Ray Data's tasks, actor pool, blocks and backpressure instead of the
product's I/O workers, holders and coalescing service. Only the read stage's loop over the
batch is re-stated here (the product's ``FleetSanitizer.process`` does read, project and
write in one call); it calls the same helper methods in the same order.

Differences that matter beyond speed (see docs/benchmarks.md):

- the adapter travels through the object store between the stages (read → holder → write:
  pickled once, as a binary column, and unpickled in both), where the product sends the
  holder only the stacked B and G = A Aᵀ and keeps the adapter in the I/O worker;
- the catalog is listed whole in the driver (``from_items``), where the product streams it;
- a task that dies is retried by Ray Data as a whole block; after its retries the whole run
  fails (or, with ``max_errored_blocks``, the block's adapters vanish from the output
  unreported): no isolation of a poison adapter; an adapter whose rows never come back is
  reported here as an error by the driver.

Usage::

    python benchmarks/raydata_sanitize.py --check        # equality with the product, tiny
    python benchmarks/raydata_sanitize.py --smoke        # what the smoke test runs

bench_fleet.py ``--modes ray,raydata`` times it against the product's executor.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("benchmarks.raydata")

#: Per worker process: the FleetSanitizer of the run (this module is imported by reference in
#: Ray's workers, which keep it between tasks), so a task does not reopen the set per batch.
_SANITIZERS: dict[Any, Any] = {}


def _sanitizer(job: Any) -> Any:
    """The run's FleetSanitizer in this process (made once; the set's metadata only)."""
    from safelora_ray.core.errors import AlignmentSetError
    from safelora_ray.pipelines.sanitize.worker import FleetSanitizer

    san = _SANITIZERS.get(job)
    if san is None:
        _SANITIZERS.clear()  # one run at a time per process
        san = FleetSanitizer(job.alignment_uri, job.out_uri, job.selection,
                             "cpu", job.force, job.max_adapter_bytes, run_id=job.run_id)
        if san.aset.content_id != job.alignment_id:
            raise AlignmentSetError(f"{job.alignment_uri} now holds alignment set "
                                    f"{san.aset.content_id}, not {job.alignment_id}")
        _SANITIZERS[job] = san
    return san


def _dump(obj: Any) -> bytes:
    """An object as a binary column value (pickled here, once). Ray Data's own fallback for
    Python objects first tries an Arrow conversion whose failure message formats the value:
    for an adapter, the repr of every tensor (~65 ms per adapter on this CPU)."""
    return b"" if obj is None else pickle.dumps(obj, protocol=5)


def _load_obj(raw: bytes) -> Any:
    # our own pickles, made by the stages above in this run (never a file's content)
    return pickle.loads(raw) if len(raw) else None


def read_stage(batch: dict[str, np.ndarray], job: Any) -> dict[str, Any]:
    """Stage 1 (CPU tasks): ledger, read and validate each adapter of the batch."""
    from safelora_ray.pipelines.sanitize.rows import base_row, mark_failed
    from safelora_ray.planning.catalog import AdapterRef

    san = _sanitizer(job)
    out: dict[str, list[Any]] = {k: [] for k in ("adapter_id", "uri", "prefix", "row",
                                                 "adapter", "fingerprint", "read_s")}
    for aid, uri, prefix in zip(batch["adapter_id"], batch["uri"], batch["prefix"],
                                strict=True):
        ref = AdapterRef(str(aid), str(uri), str(prefix))
        row = base_row(ref)
        t0 = time.perf_counter()
        adapter = fp = None
        try:  # the product's own read loop: ledger, read, check
            adapter, fp = san.load(ref, row)
        except Exception as e:  # one bad adapter never stops the batch
            mark_failed(row, e)
        for k, v in (("adapter_id", ref.adapter_id), ("uri", ref.uri), ("prefix", ref.prefix),
                     ("row", json.dumps(row)), ("adapter", _dump(adapter)),
                     ("fingerprint", fp or ""), ("read_s", time.perf_counter() - t0)):
            out[k].append(v)
    return out


class Holder:
    """Stage 2 (an actor pool): keeps the alignment set resident on its device and computes
    each batch's products, one per module (the product's ``ProjectionEngine``)."""

    def __init__(self, job: Any, num_gpus: float) -> None:
        import ray
        import torch

        from safelora_ray.core.alignment import full_precision_matmul
        from safelora_ray.execution.ray_utils import pick_device
        from safelora_ray.pipelines.sanitize.projection import MatrixCache, ProjectionEngine, SetKey

        device = pick_device(num_gpus)
        if device == "cpu":
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
        full_precision_matmul()  # as the product's workers: no TF32
        self.engine = ProjectionEngine(MatrixCache.open(
            SetKey(job.alignment_uri, job.alignment_id), device))
        self.engine.matrices.load_all()
        self.san = _sanitizer(job)  # for _project_all (its own engine is never made)
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["adapter_id"])
        loaded = [_load_obj(b) for b in batch["adapter"]]
        adapters = [a for a in loaded if a is not None]
        products = [b""] * n
        share = 0.0
        if adapters:
            t0 = time.perf_counter()
            cast, sc = self.san._project_all(adapters, self.engine.run)
            share = (time.perf_counter() - t0) / len(adapters)
            for i, a in enumerate(loaded):
                if a is not None:
                    # clone: a view would pickle the whole batch's product with each adapter
                    products[i] = _dump(({m: t.clone() for m, t in cast[a.adapter_id].items()},
                                         sc[a.adapter_id]))
        self.batches += 1
        # the adapter goes on to the write stage as it came (its pickled bytes)
        return {**batch, "products": products, "compute_s": [share] * n}


def write_stage(batch: dict[str, np.ndarray], job: Any) -> dict[str, Any]:
    """Stage 3 (CPU tasks): select, write each adapter atomically, then its ledger record
    (the product's ``FleetSanitizer._finish``)."""
    from safelora_ray.pipelines.sanitize.rows import mark_failed
    from safelora_ray.planning.catalog import AdapterRef

    san = _sanitizer(job)
    rows, layers = [], []
    for i in range(len(batch["adapter_id"])):
        t0 = time.perf_counter()
        row = json.loads(batch["row"][i])
        adapter = _load_obj(batch["adapter"][i])
        lay: list[dict[str, Any]] = []
        if adapter is not None:
            ref = AdapterRef(str(batch["adapter_id"][i]), str(batch["uri"][i]),
                             str(batch["prefix"][i]))
            cbs, scores = _load_obj(batch["products"][i])
            try:
                lay = san._finish(ref, adapter, batch["fingerprint"][i] or None, cbs, scores,
                                  row)
                row["read_s"] = round(float(batch["read_s"][i]), 4)
                row["compute_s"] = round(row["compute_s"] + float(batch["compute_s"][i]), 4)
            except Exception as e:
                mark_failed(row, e)
                lay = []
        # no batch spans the three stages: an adapter's own read + compute + write time
        row["batch_s"] = round(float(batch["read_s"][i]) + float(batch["compute_s"][i])
                               + time.perf_counter() - t0, 4)
        rows.append(json.dumps(row))
        layers.append(json.dumps(lay))
    return {"row": rows, "layers": layers}


class _TaskArgs:
    """A read task's remote arguments, given as a function (see ``fuse_read``)."""

    def __init__(self, num_cpus: float) -> None:
        self.num_cpus = num_cpus

    def __call__(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus}


def _holders(use_gpu: bool, workers_per_gpu: int) -> int:
    """One holder per GPU x workers_per_gpu, or one per node without GPUs."""
    import ray

    if use_gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 0)) * workers_per_gpu)
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")
                      and n.get("Resources", {}).get("CPU", 0) > 0))


def sanitize_raydata(*, alignment: str, adapters: str, out: str,
                     threshold: float | None = None, num_proj_layers: int | None = None,
                     batch_size: int = 8, holder_batch_size: int | None = None,
                     use_gpu: bool = False, workers_per_gpu: int = 1, task_cpus: float = 1.0,
                     holder_cpus: float | None = None, fuse_read: bool = False,
                     run_id: str | None = None, force: bool = False) -> Any:
    """Sanitize a catalog with the Ray Data pipeline (Ray must be initialised).

    Returns:
        The product's :class:`~safelora_ray.pipelines.sanitize.driver.SanitizeResult` (reports
        written by the product's ReportWriter), with a ``raydata`` dict attribute: holders,
        batch sizes, CPUs per task and actor.
    """
    import ray
    import ray.data

    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.sanitize.config import (
        REPORTS_PREFIX,
        SanitizeConfig,
        SanitizeResult,
    )
    from safelora_ray.pipelines.sanitize.rows import base_row
    from safelora_ray.pipelines.sanitize.worker import SanitizeJob
    from safelora_ray.planning.catalog import AdapterRef, iter_catalog
    from safelora_ray.reports import ReportWriter
    from safelora_ray.storage import open_storage
    from safelora_ray.storage.local import sweep_stale_writes

    t_start = time.perf_counter()
    cfg = SanitizeConfig(alignment=alignment, adapters=adapters, out=out, threshold=threshold,
                         num_proj_layers=num_proj_layers, batch_size=batch_size, force=force,
                         run_id=run_id, progress=False)
    assert cfg.run_id is not None
    aset = AlignmentSet.open(cfg.alignment)
    store = open_storage(cfg.out)
    sweep_stale_writes(store)
    job = SanitizeJob(aset.uri, aset.content_id, store.uri, cfg.selection, cfg.force,
                      cfg.max_adapter_bytes, cfg.run_id, cfg.task_timeout_s)
    prefix = f"{REPORTS_PREFIX}/{cfg.run_id}"
    result = SanitizeResult(cfg.run_id, store.uri, store.describe(prefix),
                            alignment_id=aset.content_id)
    report = ReportWriter(cfg.run_id, aset, cfg.selection, cfg.adapters)

    def record(rows: list[dict[str, Any]], layers: list[dict[str, Any]]) -> None:
        for row in rows:
            result.count(row)
        report.add(rows, layers)

    # Ray Data needs the items up front: the catalog is listed whole here.
    refs: list[AdapterRef] = []
    for item in iter_catalog(cfg.adapters):
        if isinstance(item, tuple):
            row = base_row(AdapterRef(item[0], cfg.adapters, ""))
            row["error"] = item[1]
            record([row], [])
        else:
            refs.append(item)
    holders = _holders(use_gpu, workers_per_gpu)
    hb = holder_batch_size or batch_size
    if holder_cpus is None:
        holder_cpus = 0.25 if use_gpu else 1.0
    info = {"holders": holders, "batch_size": batch_size, "holder_batch_size": hb,
            "task_cpus": task_cpus, "holder_cpus": holder_cpus,
            "holder_gpus": 1.0 / workers_per_gpu if use_gpu else 0.0, "fuse_read": fuse_read}
    # Ray Data fuses a task stage into the next actor stage when their resources are equal
    # (on CPU): the reads would then run inside the holders only. A ray_remote_args_fn
    # keeps them apart (fusion never applies to a stage that has one).
    read_args: dict[str, Any] = {} if fuse_read else {
        "ray_remote_args_fn": _TaskArgs(task_cpus)}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    seen: set[str] = set()
    try:
        if refs:
            ds = ray.data.from_items(
                [{"adapter_id": r.adapter_id, "uri": r.uri, "prefix": r.prefix} for r in refs],
                override_num_blocks=max(1, math.ceil(len(refs) / batch_size)))
            ds = ds.map_batches(read_stage, fn_kwargs={"job": job}, batch_size=batch_size,
                                batch_format="numpy", num_cpus=task_cpus, **read_args)
            ds = ds.map_batches(Holder, fn_constructor_kwargs={
                                    "job": job, "num_gpus": info["holder_gpus"]},
                                batch_size=hb, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=holders),
                                num_cpus=holder_cpus, num_gpus=info["holder_gpus"] or None)
            ds = ds.map_batches(write_stage, fn_kwargs={"job": job}, batch_size=batch_size,
                                batch_format="numpy", num_cpus=task_cpus)
            for batch in _stream(ds):
                rows = [json.loads(r) for r in batch["row"]]
                layers = [x for lay in batch["layers"] for x in json.loads(lay)]
                seen.update(r["adapter_id"] for r in rows)
                record(rows, layers)
            info["stats"] = ds.stats()  # Ray Data's own account: per stage, wall / CPU / UDF
        # Exactly one row per adapter: one that never came back is reported, not dropped.
        for ref in refs:
            if ref.adapter_id not in seen:
                row = base_row(ref)
                row["error"] = (f"adapter {ref.adapter_id!r}: no result came back from the "
                                "Ray Data pipeline")
                record([row], [])
    except BaseException:
        report.abort()
        raise
    finally:
        try:
            sweep_stale_writes(store)
        except Exception as e:
            logger.warning("could not remove stale temp files: %s", e)
    result.duration_s = time.perf_counter() - t_start
    report.finish(store, prefix, result)
    result.raydata = info  # type: ignore[attr-defined]
    return result


def _stream(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's output blocks as they finish (streaming, nothing materialised)."""
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


# ---------------------------------------------------------------------------------------------
# --check: the same bytes as the product, on a small catalog with a corrupt adapter
# ---------------------------------------------------------------------------------------------


def check_equal(n: int = 12, batch_size: int = 4) -> dict[str, Any]:
    """Sanitize one catalog with the product (in process) and with the Ray Data pipeline;
    every output file must be the same bytes and every report row the same status and
    selection. Ray must be initialised."""
    import io

    import pyarrow.parquet as pq
    from benchlib.models import TINY, write_adapters, write_pair

    from safelora_ray.pipelines.build.config import BuildConfig
    from safelora_ray.pipelines.build.driver import build
    from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, sanitize
    from safelora_ray.storage import open_storage

    with tempfile.TemporaryDirectory(prefix="raydata-check-",
                                     dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        root = Path(tmp)
        arch = TINY
        pair = write_pair(root / "models", arch)
        pool = write_adapters(root / "catalog", arch, n, rank=4)
        bad = pool[len(pool) // 2] / "adapter_model.safetensors"
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")  # a corrupt one
        aset = build(BuildConfig(base=pair["base"], aligned=pair["aligned"],
                                 out=str(root / "set"), workers=0, progress=False))
        ours = sanitize(SanitizeConfig(alignment=aset.uri, adapters=str(root / "catalog"),
                                       out=str(root / "ours"), threshold=0.35, workers=0,
                                       batch_size=batch_size, run_id="ours", progress=False))
        theirs = sanitize_raydata(alignment=aset.uri, adapters=str(root / "catalog"),
                                  out=str(root / "raydata"), threshold=0.35,
                                  batch_size=batch_size, run_id="raydata")

        def files(base: Path) -> dict[str, bytes]:
            return {p.relative_to(base).as_posix(): p.read_bytes()
                    for p in sorted(base.rglob("*")) if p.is_file()
                    and not p.relative_to(base).as_posix().startswith(("_reports", "_ledger"))}

        def rows(base: Path, run: str) -> list[tuple[Any, ...]]:
            raw = open_storage(str(base)).read(f"_reports/{run}/adapters.parquet")
            t = pq.read_table(io.BytesIO(raw)).to_pydict()
            return sorted(zip(t["adapter_id"], t["status"], t["projected"],
                              t["output_digest"], strict=True))

        def layers(base: Path, run: str) -> list[tuple[Any, ...]]:
            raw = open_storage(str(base)).read(f"_reports/{run}/layers.parquet")
            t = pq.read_table(io.BytesIO(raw)).to_pydict()
            return sorted(zip(t["adapter_id"], t["module"], t["cos"], t["projected"],
                              strict=True))

        a, b = files(root / "ours"), files(root / "raydata")
        ledger_a = {p.name: json.loads(p.read_text())["projected"]
                    for p in (root / "ours" / "_ledger").rglob("*.json")}
        ledger_b = {p.name: json.loads(p.read_text())["projected"]
                    for p in (root / "raydata" / "_ledger").rglob("*.json")}
        out = {
            "adapters": n, "ok": [ours.ok, theirs.ok], "error": [ours.error, theirs.error],
            "files": len(a), "same_files": a == b,
            "same_rows": rows(root / "ours", "ours") == rows(root / "raydata", "raydata"),
            "same_layers": (layers(root / "ours", "ours")
                            == layers(root / "raydata", "raydata")),
            "same_ledger_selection": ledger_a == ledger_b,
        }
        out["equal"] = bool(out["same_files"] and out["same_rows"] and out["same_layers"]
                            and out["same_ledger_selection"] and ours.ok == n - 1
                            and theirs.error == 1 and len(a) == 2 * (n - 1))
        return out


def main(argv: list[str] | None = None) -> int:
    import ray
    from benchlib.runs import emit, machine_info, setup_logging
    from benchlib.runtime import start_ray

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="equality with the product on a small catalog (the default action)")
    p.add_argument("--n", type=int, default=12, help="adapters in the checked catalog")
    p.add_argument("--smoke", action="store_true", help="the smoke test's size")
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)
    setup_logging()
    n = 6 if args.smoke else args.n
    info = machine_info()
    start_ray(num_cpus=2)
    try:
        res = check_equal(n=n, batch_size=2 if args.smoke else 4)
    finally:
        ray.shutdown()
    result = {"benchmark": "raydata-check", "machine": info, "check": res}
    emit(result, [("Ray Data pipeline vs the product: same outputs",
                   ["figure", "value"], [[k, str(v)] for k, v in res.items()])],
                args.out_json)
    return 0 if res["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
