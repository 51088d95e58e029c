"""Alignment-set build on Ray: plan → dispatch → publish.

The driver plans the output files (one shard, a contiguous run of layers, per worker); the
dispatcher (:mod:`safelora_ray.execution.dispatch`) runs each shard's files on its worker, in
order (:mod:`safelora_ray.pipelines.build.worker`); the driver then writes
``manifest.parquet`` and, last, ``alignment.json`` once every shard is in place.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from safelora_ray.core.errors import AlignmentSetError, ClusterError
from safelora_ray.execution import (
    INLINE_MAX_BUILD_BYTES,
    Executor,
    open_executor,
    resolve_workers,
)
from safelora_ray.execution.dispatch import Dispatcher, Policy, Task
from safelora_ray.execution.progress import Progress
from safelora_ray.formats.alignment_set import (
    AlignmentSet,
    ManifestRow,
    content_id,
    metadata_head,
    publish,
    read_metadata,
)
from safelora_ray.formats.checkpoint import Checkpoint
from safelora_ray.pipelines.build.config import BuildConfig, BuildResult
from safelora_ray.pipelines.build.worker import build_file, end_build
from safelora_ray.planning.plan import BuildPlan, plan_build, shard_modules
from safelora_ray.planning.provenance import same_inputs
from safelora_ray.storage import Storage, open_storage
from safelora_ray.storage.guards import probe_outputs

logger = logging.getLogger(__name__)

#: Times one output file is started again after its worker died, before the build fails.
MAX_FILE_ATTEMPTS = 4


@dataclass
class _Built:
    """What the workers sent back: manifest rows, each file's digest, timings."""

    rows: list[ManifestRow] = field(default_factory=list)
    shard_digests: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, float] = field(
        default_factory=lambda: {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0})
    fetched: dict[tuple[int, int], int] = field(default_factory=dict)  # (shard, worker) → bytes
    device: str = "cpu"
    first_read_at: float | None = None  # wall clock of the first module read, any worker

    def add(self, task: Task, result: dict[str, Any]) -> None:
        shard, _ = task.item
        self.rows.extend(result["rows"])
        written = result["shard"]
        self.shard_digests[written["path"]] = {"sha256": written["sha256"],
                                               "bytes": written["bytes"]}
        self.device = result["device"]
        # Counters are cumulative per builder: keep the latest (calls finish in order).
        key = (shard, task.worker or 0)
        self.fetched[key] = max(self.fetched.get(key, 0), result["bytes_fetched"])
        for k in self.stats:
            self.stats[k] += result[k]
        at = result.get("first_read_at")
        if at is not None:
            self.first_read_at = at if self.first_read_at is None else min(self.first_read_at, at)


def build(config: BuildConfig) -> BuildResult:
    """Build an alignment set (SPEC §1) on Ray.

    Args:
        config: What to build and where.

    Returns:
        A :class:`BuildResult`. If ``config.out`` already holds a complete set built from the
        same inputs (same files and versions, targets and method), it is reused as it is.

    Raises:
        CheckpointError: bad or mismatched inputs (names the tensor).
        AlignmentSetError: ``config.out`` holds a complete set built from other inputs.
    """
    t_start = time.perf_counter()
    wall_start = time.time()  # the workers' first read is stamped on the wall clock
    base = Checkpoint.open(config.base)
    aligned = Checkpoint.open(config.aligned)
    out = open_storage(config.out)

    plan = plan_build(base, aligned, config.targets, max_file_bytes=config.max_file_bytes,
                      projection=config.projection_spec)
    # The weights files read, and config.json where there is one: it decides each weight's
    # orientation (a corrected model_type must not reuse a set built the other way).
    proposed = {
        "targets": list(plan.targets),
        "method": config.projection_spec.method(),
        "base": base.source_info({m.base.path for m in plan.modules}, config=True),
        "aligned": aligned.source_info({m.aligned.path for m in plan.modules},
                                      config=True),
    }
    existing = read_metadata(out)
    if existing is not None:
        if same_inputs(existing, proposed, equal=("targets", "method"),
                       sources=("base", "aligned")):
            logger.info("%s already holds this alignment set (%s); reusing it",
                        out.uri, existing["content_id"])
            return BuildResult(out.uri, existing["content_id"], existing["num_modules"],
                               existing.get("source_bytes", 0), 0,
                               existing.get("stored_bytes", 0), time.perf_counter() - t_start,
                               reused=True)
        raise AlignmentSetError(
            f"{out.uri} already holds alignment set {existing['content_id']} built from other "
            "inputs; alignment sets are immutable: choose another --out"
        )
    probe_outputs(config.outputs)  # before any worker starts (a reused set needs no write)
    ex = _open_workers(config, plan)
    logger.info(
        "building %d modules (%s) from %s and %s on %d %s worker(s): %.2f GB to read",
        len(plan.modules), ",".join(plan.targets), base.uri, aligned.uri, len(plan.shards),
        ex.kind, plan.input_bytes / 1e9,
    )
    built = _dispatch(ex, plan, out.uri, config)
    if built.first_read_at is not None:
        # Planning, starting the workers and their first call: the build's fixed cost.
        built.stats["startup_s"] = max(0.0, built.first_read_at - wall_start)
    # Everything fetched from the sources: the driver's index/header reads + the workers'.
    bytes_read = base.storage.bytes_read + aligned.storage.bytes_read
    bytes_read += sum(built.fetched.values())
    return _publish(out, plan, proposed, built, bytes_read,
                    workers=0 if ex.in_process else len(plan.shards), t_start=t_start)


def _open_workers(config: BuildConfig, plan: BuildPlan) -> Executor:
    """The executor (one shard per worker: ``plan.shards`` is split to fit), its nodes
    checked to share the local paths."""
    wplan = resolve_workers(config.workers, config.use_gpu, config.ray_address,
                            small=plan.input_bytes <= INLINE_MAX_BUILD_BYTES, shape="build")
    if wplan.num_workers > 1:  # one shard (a contiguous run of layers) per worker
        plan.shards = shard_modules(plan.modules, wplan.num_workers, config.max_file_bytes)
        wplan = wplan.take(len(plan.shards))
    ex = open_executor(wplan, config.use_gpu)
    try:
        ex.check_shared([("--out", config.out, True), ("--base", config.base, False),
                         ("--aligned", config.aligned, False)])
    except BaseException:
        ex.close(False)
        raise
    return ex


def _dispatch(ex: Executor, plan: BuildPlan, out_uri: str, config: BuildConfig) -> _Built:
    """Build every shard's files on its worker; releases the workers."""
    # An interrupted build may have left shards: they are overwritten, and nothing reads them
    # without alignment.json.
    build_id = uuid.uuid4().hex
    shipped = [ex.put(files) for files in plan.shards]
    # A shard's files go to one worker, in order: its reader runs ahead of its writer.
    tasks = [Task(build_file, (build_id, shard, shipped[shard], out_uri, config.prefetch, j),
                  item=(shard, j), pin=shard, group="stream")
             for shard, files in enumerate(plan.shards) for j in range(len(files))]
    policy = Policy("alignment shard file", config.task_timeout_s, build_id, role="device",
                    in_flight=None, attempts=MAX_FILE_ATTEMPTS)
    built = _Built()
    bar = Progress("build", "B", total=plan.input_bytes, unit_scale=True,
                   enabled=config.progress)

    def done(task: Task, result: dict[str, Any]) -> None:
        built.add(task, result)
        bar.update(result["input_bytes"])

    def failed(task: Task, e: BaseException) -> None:
        shard, j = task.item
        raise ClusterError(
            f"{plan.shards[shard][j].path}: its worker died {MAX_FILE_ATTEMPTS} "
            f"times while building it ({type(e).__name__})") from e

    ok = False
    try:
        # Files already published by an interrupted build stay (a rerun overwrites them);
        # without alignment.json nothing reads them as a set.
        Dispatcher(ex, policy).run(tasks, done, failed)
        ok = True
    finally:
        bar.close()
        if ok and not ex.owns_workers:
            ex.notify(end_build, build_id)  # workers kept by a session: stop its readers
        ex.close(ok)
    return built


def _publish(out: Storage, plan: BuildPlan, proposed: dict[str, Any], built: _Built,
             bytes_read: int, workers: int, t_start: float) -> BuildResult:
    """Write the manifest and, last, ``alignment.json``: the set is complete."""
    rows = built.rows
    files_out = sorted({f.path for s in plan.shards for f in s})
    cid = content_id({"method": proposed["method"], "targets": list(plan.targets)}, rows)
    # The plan's output size is an upper bound for the exact form (k is found by the build).
    stored_bytes = sum(4 * math.prod(r.stored_shape) for r in rows)
    duration = time.perf_counter() - t_start
    metadata = {
        **metadata_head(cid),
        **proposed,
        "dtypes": {
            "base": sorted({m.base.dtype for m in plan.modules}),
            "aligned": sorted({m.aligned.dtype for m in plan.modules}),
            "stored": "F32",
        },
        "num_modules": len(rows),
        "shards": files_out,
        "source_bytes": plan.input_bytes,
        "bytes_read": bytes_read,
        "stored_bytes": stored_bytes,
        "build": {"workers": workers, "device": built.device,
                  "duration_s": round(duration, 3),
                  **{k: round(v, 3) for k, v in built.stats.items()}},
    }
    publish(out, rows, metadata, built.shard_digests)  # alignment.json last
    logger.info("alignment set %s written to %s in %.1f s", cid, out.uri, duration)
    return BuildResult(out.uri, cid, len(rows), plan.input_bytes, bytes_read,
                       stored_bytes, duration, workers=workers, device=built.device,
                       stats=built.stats)


def inspect(uri: str) -> AlignmentSet:
    """Open the alignment set at ``uri`` (see :meth:`AlignmentSet.summary`)."""
    return AlignmentSet.open(uri)


__all__ = ["MAX_FILE_ATTEMPTS", "BuildConfig", "BuildResult", "build", "inspect"]
