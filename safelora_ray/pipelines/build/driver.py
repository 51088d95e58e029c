"""Alignment-set build on Ray: plan on the driver, one worker per shard of layers.

Each worker (a :class:`~safelora_ray.execution.workers.SafeLoraWorker` actor, or this
process for a small pair: see :mod:`safelora_ray.execution.workers`) streams its modules: a
reader thread fetches the next modules' base and aligned tensors (ranged reads) while the
current one is computed, so a worker holds only a few modules in memory whatever the model
size. Output files are written to a local temp file with a precomputed safetensors header,
then published atomically; ``manifest.parquet`` and, last, ``alignment.json`` are written by
the driver once every shard is in place.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safelora_ray._version import __version__
from safelora_ray.core.alignment import as_linear, check_norm, start_alignment
from safelora_ray.core.errors import (
    AlignmentSetError,
    CheckpointError,
    ClusterError,
    ConfigError,
    Interrupted,
)
from safelora_ray.core.validate import check_at_least, check_positive, flag
from safelora_ray.execution import (
    INLINE_MAX_BUILD_BYTES,
    WorkerContext,
    open_executor,
    resolve_workers,
)
from safelora_ray.execution.buffers import BufferPool
from safelora_ray.execution.device import to_host
from safelora_ray.execution.dispatch import Dispatcher, Policy, Task
from safelora_ray.execution.prefetch import read_ahead
from safelora_ray.execution.progress import Progress
from safelora_ray.formats.alignment_set import (
    FORMAT,
    FORMAT_VERSION,
    AlignmentSet,
    ManifestRow,
    content_id,
    publish,
    read_metadata,
)
from safelora_ray.formats.checkpoint import Checkpoint, read_ref
from safelora_ray.formats.integrity import (  # noqa: F401 (the digest's scheme, re-exported)
    DIGEST_CHUNK,
    DIGEST_SCHEME,
    FileHasher,
)
from safelora_ray.formats.integrity import tree_digest as source_digest
from safelora_ray.formats.safetensors import SafetensorsWriter
from safelora_ray.planning.plan import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_TARGETS,
    FilePlan,
    ModulePlan,
    Projection,
    parse_targets,
    plan_build,
    shard_modules,
)
from safelora_ray.planning.provenance import same_inputs
from safelora_ray.storage import open_storage
from safelora_ray.storage.cache import StorageCache
from safelora_ray.storage.guards import Output, check_outputs, probe_outputs
from safelora_ray.storage.uri import check_uri

logger = logging.getLogger(__name__)



@dataclass
class BuildConfig:
    """Parameters of one alignment-set build.

    Attributes:
        base: URI of the base (unaligned) checkpoint.
        aligned: URI of the aligned checkpoint.
        out: URI where the alignment set is written.
        targets: Module-name suffixes (``q_proj,v_proj``).
        workers: Worker actors; 0 = in this process; None = one per GPU, or one per CPU
            without GPUs (in this process for a small pair when no Ray cluster is
            configured: see :mod:`safelora_ray.execution.workers`).
        use_gpu: Force GPU (True) or CPU (False); None = GPUs when the cluster has them.
        max_file_bytes: Cap on one output safetensors file.
        prefetch: Modules read ahead per worker (bounds worker memory).
        task_timeout_s: Longest a single output file may take before the build fails.
        progress: Show a progress bar.
        ray_address: Cluster address; None = ``RAY_ADDRESS`` or a new local Ray.
        projection: ``fast`` (the paper's C = V Vᵀ/‖V‖_F) or ``exact`` (the truncated
            projection U_k U_kᵀ, SPEC §1), with ``rank`` or ``energy``.
        rank: ``exact``: keep k = rank directions per module.
        energy: ``exact``: keep the smallest k with Σ_{i≤k}σᵢ²/Σσᵢ² ≥ energy.
    """

    base: str
    aligned: str
    out: str
    targets: Sequence[str] | str = DEFAULT_TARGETS
    workers: int | None = None
    use_gpu: bool | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    prefetch: int = 2
    task_timeout_s: float = 3600.0
    progress: bool = True
    ray_address: str | None = None
    projection: str = "fast"
    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        self.projection_spec  # noqa: B018 - validates projection/rank/energy
        if self.workers is not None:
            check_at_least(self.workers, "workers", 0, " (0 = in this process)")
        if isinstance(self.max_file_bytes, bool) or not isinstance(self.max_file_bytes, int) \
                or self.max_file_bytes < 1:
            raise ConfigError(f"--max-file-gb must be positive, got {self.max_file_bytes!r} bytes")
        check_at_least(self.prefetch, "prefetch", 1)
        check_positive(self.task_timeout_s, "timeout")
        for name in ("base", "aligned", "out"):
            check_uri(getattr(self, name), flag(name))
        # Never write into a source checkout (nor around one: its files would be listed as
        # part of the set's folder).
        check_outputs(self.outputs, [
            (flag(name), getattr(self, name),
             "the alignment set would be written into a source checkout")
            for name in ("base", "aligned")])

    @property
    def outputs(self) -> list[Output]:
        """What the build writes (see :func:`~safelora_ray.storage.guards.check_outputs`)."""
        return [Output("--out", self.out)]

    @property
    def projection_spec(self) -> Projection:
        """The stored form as a :class:`~safelora_ray.planning.plan.Projection` (validated)."""
        return Projection(self.projection, self.rank, self.energy)  # type: ignore[arg-type]


@dataclass
class BuildResult:
    """What a build did."""

    uri: str
    content_id: str
    num_modules: int
    source_bytes: int
    bytes_read: int
    stored_bytes: int
    duration_s: float
    reused: bool = False
    workers: int = 0  # worker actors used; 0 = this process (or nothing built: reused)
    device: str = "cpu"
    stats: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


@dataclass
class _Fetched:
    module: ModulePlan
    base: torch.Tensor
    aligned: torch.Tensor
    digest: str
    read_s: float
    buffers: tuple[Any, Any]


@dataclass
class _Computed:
    """A module handed from the compute loop to the writer thread."""

    item: _Fetched
    tensor: torch.Tensor  # on the host (pinned, being copied into) or, on a CPU, the result
    norm: torch.Tensor  # ‖V‖_F, 0-dim float64, on the device: checked by the writer
    energy: float | None
    done: Any  # a CUDA event recorded after the copy to the host, or None


class _Writer:
    """Writes computed modules in order on its own thread, so a module is written (and its
    result copied off the GPU) while the next one is read and computed; bounded: at most
    ``depth`` modules wait.

    Args:
        writer: The file's writer, or None to hold the tensors (the exact form's files are
            written once all their modules are known).
        release: Gives a module's read buffers back once its copies are done.
        depth: Modules waiting at most.
    """

    def __init__(self, writer: SafetensorsWriter | None, release: Callable[[_Fetched], None],
                 shard: str, depth: int = 2) -> None:
        self.writer = writer
        self.release = release
        self.shard = shard
        self.rows: list[ManifestRow] = []
        self.held: list[tuple[str, torch.Tensor]] = []
        self.write_s = 0.0
        self._queue: queue.Queue[_Computed | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="safelora-write", daemon=True)
        self._thread.start()

    def put(self, c: _Computed) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(c, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait for every module to be written; raises what the writer thread raised."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        try:
            while True:
                c = self._queue.get()
                if c is None or self._error is not None:
                    return
                t0 = time.perf_counter()
                if c.done is not None:
                    c.done.synchronize()  # the copy to the host (and all before it) is done
                m = c.item.module
                # The reads are consumed (converted, copied to the device): their buffers can
                # take the next modules' bytes.
                self.release(c.item)
                norm = float(c.norm)
                try:
                    check_norm(norm)
                except ValueError as e:
                    raise CheckpointError(f"module {m.module!r}: {e}") from None
                if self.writer is not None:
                    self.writer.write(m.module, c.tensor)
                else:
                    self.held.append((m.module, c.tensor))
                self.rows.append(ManifestRow(
                    module=m.module, tensor=m.base.name, layer=m.layer, kind=m.kind,
                    shape=m.shape, form=m.form, stored_shape=tuple(c.tensor.shape),
                    shard=self.shard, norm=norm, source_digest=c.item.digest,
                    base_dtype=m.base.dtype, aligned_dtype=m.aligned.dtype,
                    layout=m.layout,
                    proj_rank=int(c.tensor.shape[1]) if m.form == "U" else None,
                    proj_energy=c.energy,
                ))
                self.write_s += time.perf_counter() - t0
        except BaseException as e:  # raised in the compute loop's next put, or finish
            self._error = e


class ShardBuilder:
    """Builds the output files of one shard; plain Python (wrapped as a Ray actor below).

    Args:
        files: The shard's output files, in the order they will be requested.
        out_uri: The alignment set's URI.
        device: ``cpu`` or ``cuda``.
        prefetch: Modules read ahead.
    """

    def __init__(self, files: Sequence[FilePlan], out_uri: str, device: str, prefetch: int = 2):
        self.files = list(files)
        self.out = open_storage(out_uri)
        self.device = device
        self.prefetch = prefetch
        self._storages = StorageCache()
        self._reader: Iterator[_Fetched] | None = None
        self._next_file = -1
        self._pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="safelora-read")
        self._hash_pool = cf.ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                                thread_name_prefix="safelora-hash")
        # Enough for the modules in flight: read ahead (prefetch), one computing, one reading.
        biggest = max((m.base.nbytes + m.aligned.nbytes for f in self.files for m in f.modules),
                      default=0)
        # Pinned on a GPU: its copies from them run asynchronously. Enough for a module being
        # written, the prefetched ones and one being read.
        self._buffers = BufferPool(max_free=(2 * prefetch + 2) * biggest,
                                    pinned=device.startswith("cuda"))

    def close(self) -> None:
        """Stop the reader thread and its pools (a long-lived worker moves on to other work)."""
        if self._reader is not None:
            self._reader.close()  # stops its thread
            self._reader = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._hash_pool.shutdown(wait=False, cancel_futures=True)

    def release(self, item: _Fetched) -> None:
        """Give a fetched module's read buffers back once nothing uses its tensors."""
        for buf in item.buffers:
            self._buffers.put(buf)

    def bytes_fetched(self) -> int:
        """Bytes read from source storages so far (their own counters)."""
        return self._storages.bytes_read

    def _fetch(self, m: ModulePlan) -> _Fetched:
        """Read one module's base and aligned tensors (two threads), then hash them."""
        t0 = time.perf_counter()
        bufs = (self._buffers.get(m.base.nbytes), self._buffers.get(m.aligned.nbytes))
        fb = self._pool.submit(read_ref, self._storages.get(m.base.uri), m.base, bufs[0])
        fa = self._pool.submit(read_ref, self._storages.get(m.aligned.uri), m.aligned, bufs[1])
        (tb, bb), (ta, ba) = fb.result(), fa.result()
        digest = source_digest([bb, ba], self._hash_pool)
        return _Fetched(m, tb, ta, digest, time.perf_counter() - t0, bufs)

    def _start_reader(self, first_file: int) -> None:
        # Reading module i+1 while hashing module i was tried: on 2 cores it was slower
        # (2.0 vs 2.14 GB/s), reads and hash threads competing for the same cores.
        if self._reader is not None:
            self._reader.close()
        modules = [m for f in self.files[first_file:] for m in f.modules]
        self._reader = read_ahead((self._fetch(m) for m in modules), self.prefetch)

    def _modules(self, index: int) -> Iterator[_Fetched]:
        if self._reader is None or index != self._next_file:
            self._start_reader(index)  # first call, or a retry after a restart
        self._next_file = index + 1
        assert self._reader is not None
        for _ in self.files[index].modules:
            try:
                yield next(self._reader)
            except BaseException:
                self._reader = None
                raise

    def build_file(self, index: int,
                   cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Compute and publish output file ``index``; returns its manifest rows and timings.

        Read, copy to the device, ``V Vᵀ``, copy back and write all overlap: the reader thread
        reads (into pinned buffers for a GPU) and hashes the next modules, this thread queues
        each module's products on the device without waiting for them, and a writer thread
        waits for each result's copy to the host and writes it while the next is computed.
        Nothing waits on the GPU module by module.

        ``cancelled`` is polled before each module: once it says so, the file is abandoned
        unpublished (:class:`Interrupted`)."""
        fplan = self.files[index]
        timings = {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
        # The exact projection's k (energy mode) is known only once computed: its files are
        # written once all their modules are (at most max_file_bytes of U_k held), the others
        # as each module is computed.
        deferred = any(m.form == "U" for m in fplan.modules)
        cuda = self.device.startswith("cuda")
        hasher = FileHasher()  # the file's and each tensor's digests, taken as written
        # Written straight into place on local storage (temp file beside it, then a rename);
        # through a temp file and an upload on object stores.
        with self.out.writing_file(fplan.path) as tmp:
            with contextlib.ExitStack() as stack:
                writer = None
                if not deferred:
                    layout = [(m.module, "F32", m.stored_shape) for m in fplan.modules]
                    writer = stack.enter_context(
                        SafetensorsWriter(tmp, layout, {"format": FORMAT}, hasher))
                sink = _Writer(writer, self.release, fplan.path, depth=self.prefetch)
                try:
                    for item in self._modules(index):
                        if cancelled is not None and cancelled():
                            raise Interrupted(f"build of {fplan.path} interrupted")
                        m = item.module
                        timings["read_s"] += item.read_s
                        t0 = time.perf_counter()
                        try:
                            pending = start_alignment(
                                as_linear(item.base.to(self.device, non_blocking=True),
                                          m.layout),
                                as_linear(item.aligned.to(self.device, non_blocking=True),
                                          m.layout),
                                form=m.form, rank=m.rank, energy=m.energy,
                            )
                        except ValueError as e:
                            raise CheckpointError(f"module {m.module!r}: {e}") from None
                        # On a GPU: an asynchronous copy, and the event that marks it done.
                        host, done = pending.tensor, None
                        if cuda:
                            host = to_host(pending.tensor)
                            done = torch.cuda.Event()
                            done.record()
                        sink.put(_Computed(item, host, pending.norm, pending.energy, done))
                        timings["compute_s"] += time.perf_counter() - t0
                        del item, pending, host
                    sink.finish()
                except BaseException:
                    sink.abort()
                    raise
                timings["write_s"] += sink.write_s
            t0 = time.perf_counter()
            if deferred:
                layout = [(name, "F32", tuple(t.shape)) for name, t in sink.held]
                with SafetensorsWriter(tmp, layout, {"format": FORMAT}, hasher) as held_writer:
                    for name, t in sink.held:
                        held_writer.write(name, t)
                sink.held.clear()
            size = os.path.getsize(tmp)
        timings["write_s"] += time.perf_counter() - t0  # the commit: fsync + rename (upload)
        return {
            "rows": [dataclasses.replace(r, digest=hasher.tensors[r.module]) for r in sink.rows],
            "shard": {"path": fplan.path, "sha256": hasher.file_digest(), "bytes": size},
            "input_bytes": fplan.input_bytes,
            "bytes_fetched": self.bytes_fetched(),
            **timings,
            "device": self.device,
        }


#: Worker slots holding a build's shard builders: ``build:<shard>`` (a worker that takes over
#: the files of a lost worker's shard keeps its own shard's builder beside it).
BUILD_SLOT = "build:"
#: Times one output file is started again after its worker died, before the build fails.
MAX_FILE_ATTEMPTS = 4


def build_file(ctx: WorkerContext, build_id: str, shard: int, files: Sequence[FilePlan],
               out_uri: str, prefetch: int, index: int) -> dict[str, Any]:
    """Task: compute and publish output file ``index`` of shard ``shard`` (see
    ``ShardBuilder``).

    The worker keeps the shard's builder (and its reader thread, already reading the next
    file's modules) between the calls of one build.
    """
    builder = ctx.resident(f"{BUILD_SLOT}{shard}", build_id,
                           lambda: ShardBuilder(files, out_uri, ctx.device, prefetch))
    return builder.build_file(index, cancelled=lambda: ctx.cancelled(build_id))


def end_build(ctx: WorkerContext, build_id: str) -> None:
    """Task: stop the reader threads of ``build_id`` (a session's worker moves on)."""
    for slot in ctx.slots():
        if slot.startswith(BUILD_SLOT):
            ctx.drop(slot, build_id)


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


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
    base = Checkpoint.open(config.base)
    aligned = Checkpoint.open(config.aligned)
    out = open_storage(config.out)

    plan = plan_build(base, aligned, config.targets, max_file_bytes=config.max_file_bytes,
                      projection=config.projection_spec)
    method = config.projection_spec.method()
    # The weights files read, and config.json where there is one: it decides each weight's
    # orientation (a corrected model_type must not reuse a set built the other way).
    proposed = {
        "targets": list(plan.targets),
        "method": method,
        "base": base.source_info({m.base.path for m in plan.modules}, config=True),
        "aligned": aligned.source_info({m.aligned.path for m in plan.modules}, config=True),
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
    wplan = resolve_workers(config.workers, config.use_gpu, config.ray_address,
                            small=plan.input_bytes <= INLINE_MAX_BUILD_BYTES, shape="device")
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
    # An interrupted build may have left shards: they are overwritten, and nothing reads them
    # without alignment.json.
    logger.info(
        "building %d modules (%s) from %s and %s on %d %s worker(s): %.2f GB to read",
        len(plan.modules), ",".join(plan.targets), base.uri, aligned.uri, len(plan.shards),
        ex.kind, plan.input_bytes / 1e9,
    )
    build_id = uuid.uuid4().hex
    shipped = [ex.put(files) for files in plan.shards]
    # A shard's files go to one worker, in order: its reader runs ahead of its writer.
    tasks = [Task(build_file, (build_id, shard, shipped[shard], out.uri, config.prefetch, j),
                  item=(shard, j), pin=shard, group="stream")
             for shard, files in enumerate(plan.shards) for j in range(len(files))]
    policy = Policy("alignment shard file", config.task_timeout_s, build_id, role="device",
                    in_flight=None, attempts=MAX_FILE_ATTEMPTS)
    rows: list[ManifestRow] = []
    shard_digests: dict[str, dict[str, Any]] = {}
    stats = {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
    fetched: dict[tuple[int, int], int] = {}
    device = "cpu"
    bar = Progress("build", "B", total=plan.input_bytes, unit_scale=True,
                   enabled=config.progress)

    def done(task: Task, result: dict[str, Any]) -> None:
        nonlocal device
        shard, _ = task.item
        rows.extend(result["rows"])
        written = result["shard"]
        shard_digests[written["path"]] = {"sha256": written["sha256"],
                                          "bytes": written["bytes"]}
        device = result["device"]
        # Counters are cumulative per builder: keep the latest (calls finish in order).
        key = (shard, task.worker or 0)
        fetched[key] = max(fetched.get(key, 0), result["bytes_fetched"])
        for k in stats:
            stats[k] += result[k]
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

    files_out = sorted({f.path for s in plan.shards for f in s})
    # Everything fetched from the sources: the driver's index/header reads + the workers'.
    bytes_read = base.storage.bytes_read + aligned.storage.bytes_read
    bytes_read += sum(fetched.values())
    core = {"method": method, "targets": list(plan.targets)}
    cid = content_id(core, rows)
    # The plan's output size is an upper bound for the exact form (k is found by the build).
    stored_bytes = sum(4 * math.prod(r.stored_shape) for r in rows)
    duration = time.perf_counter() - t_start
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "content_id": cid,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
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
        "build": {"workers": 0 if ex.in_process else len(plan.shards), "device": device,
                  "duration_s": round(duration, 3),
                  **{k: round(v, 3) for k, v in stats.items()}},
    }
    publish(out, rows, metadata, shard_digests)  # alignment.json last: the set is complete
    logger.info("alignment set %s written to %s in %.1f s", cid, out.uri, duration)
    return BuildResult(out.uri, cid, len(rows), plan.input_bytes, bytes_read,
                       stored_bytes, duration,
                       workers=0 if ex.in_process else len(plan.shards), device=device,
                       stats=stats)


def inspect(uri: str) -> AlignmentSet:
    """Open the alignment set at ``uri`` (see :meth:`AlignmentSet.summary`)."""
    return AlignmentSet.open(uri)


__all__ = ["BuildConfig", "BuildResult", "ShardBuilder", "build", "build_file", "end_build",
           "inspect"]
