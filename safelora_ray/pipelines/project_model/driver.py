"""Full fine-tunes (SPEC §3): project a fully fine-tuned checkpoint of the aligned model.

``project-model`` reads an alignment set, the aligned checkpoint and a full fine-tune of it,
and writes a complete Hugging Face checkpoint in the fine-tune's own layout: per target
module ΔW = W_ft − W_aligned (float32), cos(ΔW, CΔW) rounded to 5 decimals, and where
selected W_out = W_aligned + C ΔW cast to the tensor's dtype; every other tensor, the
safetensors headers (metadata included) and the non-weight files are the fine-tune's, byte
for byte.

Work unit: one output file = one weights file of the fine-tune (same name, same tensors in the
same order, same header bytes), so the index stays valid. Files go to workers (Ray actors, or
this process for a small model) through the execution layer
(:mod:`safelora_ray.execution.workers`); a worker streams its file: a reader thread fetches
the next items ahead (a bounded queue) while
the current one is written: a non-target tensor as ranged-read chunks of ``chunk_bytes``
(never whole; all-zero chunks become holes of the output), a target module as its fine-tuned
and aligned weights plus the module's alignment matrix (ranged reads). A worker holds a few
chunks and a few modules, whatever the model's size.

Selection. Threshold mode needs nothing global: one pass, each module decided where it is
computed. Number mode sets τ := the k-th smallest rounded cosine over *all* the model's target
modules, so it runs two phases: (1) workers compute every module's cosine and norms and return
only those numbers (no ΔW or CΔW is kept anywhere: a 70B model's q/v residuals would be
~24 GB); the driver selects; (2) the writing pass, the selection known, projects only the
selected modules (their aligned weight and matrix are read again) and copies the others like
non-targets. Number mode thus reads the fine-tune's target tensors twice, and the aligned
weights and matrices of the selected modules twice: the price of bounded memory.

Visibility and reruns. The output is a checkpoint only once its marker exists: the index for a
sharded checkpoint (written last), ``model.safetensors`` for a single file (written after the
config and tokenizer files). ``_safelora/projection.json`` records the inputs (alignment set
content id, file versions of both checkpoints, selection) before anything else is written, and
the run's figures once complete. A rerun finds a complete output from the same inputs and
reuses it; a complete output from other inputs, or a checkpoint not written by this command,
is refused; an incomplete one (no marker) is overwritten.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safelora_ray._version import __version__
from safelora_ray.core.errors import (
    CheckpointError,
    ConfigError,
    Interrupted,
    NotFoundError,
)
from safelora_ray.core.math_core import (
    AlignmentMatrix,
    ResidualScore,
    as_linear,
    residual_delta,
    residual_score,
    select_modules,
)
from safelora_ray.core.selection import Selection
from safelora_ray.core.validate import check_at_least, check_positive, flag
from safelora_ray.execution import (
    INLINE_MAX_BUILD_BYTES,
    WORKER_LOST,
    WorkerContext,
    open_executor,
    resolve_workers,
    wind_down,
)
from safelora_ray.execution.buffers import BufferPool
from safelora_ray.execution.prefetch import read_ahead
from safelora_ray.execution.progress import Progress
from safelora_ray.formats.alignment_set import AlignmentSet, ManifestRow
from safelora_ray.formats.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    TensorRef,
    read_ref,
)
from safelora_ray.formats.peft import is_weight_file
from safelora_ray.planning.plan import (
    check_target_weight,
    match_target,
    weight_layouts,
)
from safelora_ray.reports.model import write_reports
from safelora_ray.storage import Storage, open_storage
from safelora_ray.storage.base import check_uri, split_uri
from safelora_ray.storage.cache import StorageCache
from safelora_ray.storage.guards import Output, check_outputs, probe_outputs
from safelora_ray.storage.lease import hold_output
from safelora_ray.storage.local import sweep_stale_writes  # killed writers' temps

logger = logging.getLogger(__name__)

FORMAT = "safelora-ray/projected-model"
FORMAT_VERSION = 1
#: Our folder inside the output checkpoint (Hugging Face loaders ignore subfolders).
STATE_DIR = "_safelora"
PROVENANCE_FILE = f"{STATE_DIR}/projection.json"
#: Largest non-weight file copied (tokenizers are tens of MB).
MAX_EXTRA_BYTES = 1024**3
#: A file that keeps failing because its worker dies is given up after this many tries.
MAX_LOST = 3
DEFAULT_CHUNK_BYTES = 64 * 1024**2


@dataclass
class FinetuneConfig:
    """Parameters of one ``project-model`` run.

    Attributes:
        alignment: URI of a complete alignment set (built from the aligned model's pair).
        aligned: URI of the aligned checkpoint the fine-tune started from.
        finetuned: URI of the fully fine-tuned checkpoint.
        out: Where the projected checkpoint is written (local path or ``s3://``).
        threshold: Project every target module whose rounded cosine is ≤ this.
        num_proj_layers: Or: τ := the k-th smallest rounded cosine over all target modules.
        strict_k: With ``num_proj_layers``: exactly k modules, ties broken by module name.
        reports: Where the reports go; default ``<out>/_safelora``.
        workers: Worker actors; 0 = in this process; None = one per GPU, else one per CPU
            (in this process for a small model when no Ray cluster is configured).
        use_gpu: Force GPU (True) or CPU (False); None = GPUs when the cluster has them.
        chunk_bytes: Size of the ranged reads that copy non-target tensors.
        prefetch: Items (chunks or modules) a worker reads ahead.
        task_timeout_s: Longest one output file may take.
        progress: Show a progress bar.
        ray_address: Cluster address; None = ``RAY_ADDRESS`` or a new local Ray.
        wait_s: When another run holds ``out``'s lease: wait at most this long for it
            (``math.inf``: as long as it takes); None: refuse at once (LeaseHeldError).
    """

    alignment: str
    aligned: str
    finetuned: str
    out: str
    threshold: float | None = None
    num_proj_layers: int | None = None
    strict_k: bool = False
    reports: str | None = None
    workers: int | None = None
    use_gpu: bool | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    prefetch: int = 2
    task_timeout_s: float = 3600.0
    progress: bool = True
    ray_address: str | None = None
    wait_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("alignment", "aligned", "finetuned", "out"):
            check_uri(getattr(self, name), flag(name))
        if self.reports is not None:
            check_uri(self.reports, "--reports")
        Selection(self.threshold, self.num_proj_layers, self.strict_k)  # checks
        if self.workers is not None:
            check_at_least(self.workers, "workers", 0, " (0 = in this process)")
        if self.chunk_bytes < 4096:
            raise ConfigError("chunk_bytes must be at least 4096")
        check_at_least(self.prefetch, "prefetch", 1)
        check_positive(self.task_timeout_s, "timeout")
        if split_uri(self.out)[0] == "hf":
            raise ConfigError(f"--out {self.out}: the Hub is read-only here; write to a path "
                              "or s3://")
        # Inputs are never written: the projected checkpoint and its reports go apart from
        # all three.
        check_outputs(self.outputs, [
            (flag(name), getattr(self, name), "the outputs would be written into an input")
            for name in ("alignment", "aligned", "finetuned")])

    @property
    def outputs(self) -> list[Output]:
        """What the run writes (see :func:`~safelora_ray.storage.guards.check_outputs`)."""
        return [Output("--out", self.out),
                *([Output("--reports", self.reports)] if self.reports is not None else [])]

    @property
    def selection(self) -> dict[str, Any]:
        """The selection parameters, as recorded in the provenance and reports."""
        return Selection(self.threshold, self.num_proj_layers, self.strict_k).record()


@dataclass
class FinetuneResult:
    """What a ``project-model`` run did.

    Attributes:
        uri: The output checkpoint.
        reports_uri: Where ``layers.parquet``, ``summary.json`` and ``report.html`` are.
        modules: Target modules scored.
        selected: Modules projected.
        tau: The threshold applied (``threshold``, or the k-th smallest rounded cosine).
        bytes_read: Bytes fetched from the three inputs (driver and workers).
        must_read_bytes: What any run must read: every byte of the fine-tune's weights files,
            the aligned target tensors and the set's matrices of the target modules.
        bytes_written: Bytes of the output weights files.
        reused: The output was already complete, from the same inputs.
    """

    uri: str
    reports_uri: str
    modules: int = 0
    selected: int = 0
    tau: float | None = None
    bytes_read: int = 0
    must_read_bytes: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0
    reused: bool = False
    workers: int = 0
    device: str = "cpu"
    stats: dict[str, float] = field(default_factory=dict)
    selected_modules: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Plan (driver)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetPlan:
    """One target module: where its tensors are and how its weight is stored."""

    module: str
    kind: str
    layer: int | None
    ft: TensorRef
    aligned: TensorRef
    layout: str
    form: str
    matrix_bytes: int
    proj_rank: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        """nn.Linear's d_out x d_in."""
        return self.ft.shape[::-1] if self.layout == "conv1d" else self.ft.shape


@dataclass(frozen=True)
class Segment:
    """A tensor of an output file, in data order: ``[start, end)`` absolute in the file."""

    name: str
    start: int
    end: int
    target: TargetPlan | None = None


@dataclass(frozen=True)
class OutputFile:
    """One weights file of the fine-tune, rewritten under the same name."""

    path: str
    size: int
    data_start: int
    segments: tuple[Segment, ...]

    @property
    def targets(self) -> list[TargetPlan]:
        return [s.target for s in self.segments if s.target is not None]


@dataclass
class ModelPlan:
    """Everything a run needs to know before reading any tensor data."""

    files: list[OutputFile]
    targets: list[TargetPlan]
    extra_files: list[tuple[str, int]]  # non-weight files copied: (path, size)
    skipped_files: list[str]  # weight files not in the checkpoint: never copied

    @property
    def weights_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def must_read_bytes(self) -> int:
        """Every byte of the fine-tune's weights and copied files, the aligned weights and
        the set's matrices of the target modules: what any run must read."""
        return (self.weights_bytes + sum(n for _, n in self.extra_files)
                + sum(t.aligned.nbytes + t.matrix_bytes for t in self.targets))


def plan_model(aset: AlignmentSet, aligned: Checkpoint, ft: Checkpoint) -> ModelPlan:
    """Pair the set's modules with both checkpoints' tensors and check them.

    Raises:
        CheckpointError: a module of the set is missing from a checkpoint, the fine-tune has a
            target tensor the set lacks, shapes or orientations disagree, or a target weight is
            not a 2-D float tensor; the message names the tensor.
    """
    targets_of_set = aset.targets
    rows: dict[str, ManifestRow] = {r.tensor: r for r in aset.rows.values()}
    extra = sorted(n for n in ft.weight_map
                   if n.endswith(".weight") and n not in rows
                   and match_target(n[: -len(".weight")], targets_of_set) is not None)
    if extra:
        raise CheckpointError(
            f"{ft.uri} has target tensor(s) that alignment set {aset.content_id} (targets "
            f"{','.join(targets_of_set)}) lacks: {', '.join(extra[:5])}: the set was built "
            "for another model")
    for ckpt, what in ((ft, "fine-tuned"), (aligned, "aligned")):
        missing = sorted(n for n in rows if n not in ckpt.weight_map)
        if missing:
            raise CheckpointError(
                f"the {what} checkpoint {ckpt.uri} lacks tensor(s) of alignment set "
                f"{aset.content_id}: {', '.join(missing[:5])}")
    layouts = weight_layouts([ft, aligned], [r.module for r in rows.values()])
    by_name: dict[str, TargetPlan] = {}
    for name, row in rows.items():
        f, a = ft.ref(name), aligned.ref(name)
        check_target_weight(f)
        check_target_weight(a)
        if f.shape != a.shape:
            raise CheckpointError(
                f"tensor {name!r}: shape {list(f.shape)} in the fine-tune {ft.uri} but "
                f"{list(a.shape)} in the aligned model {aligned.uri}")
        if layouts[row.module] != row.layout:
            raise CheckpointError(
                f"module {row.module!r}: alignment set {aset.content_id} holds it as a "
                f"{row.layout} weight but {ft.uri}'s config.json makes it "
                f"{layouts[row.module]}: the set was built from another model, or by a "
                "safelora-ray that did not record weight layouts (rebuild it)")
        linear = f.shape[::-1] if row.layout == "conv1d" else f.shape
        if tuple(linear) != tuple(row.shape):
            raise CheckpointError(
                f"tensor {name!r}: {list(linear)} (d_out x d_in) in {ft.uri} but "
                f"{list(row.shape)} in alignment set {aset.content_id}")
        by_name[name] = TargetPlan(
            module=row.module, kind=row.kind, layer=row.layer, ft=f, aligned=a,
            layout=row.layout, form=row.form, matrix_bytes=4 * math.prod(row.stored_shape),
            proj_rank=row.proj_rank)
    files = []
    for path in ft.files:
        header = ft.header(path)
        names_here = [n for n, p in ft.weight_map.items() if p == path]
        if sorted(names_here) != sorted(header.tensors):
            odd = sorted(set(header.tensors) ^ set(names_here))[:5]
            raise CheckpointError(
                f"{ft.storage.describe(path)}: its tensors and the index disagree "
                f"({', '.join(odd)}): the index must map every tensor of every file")
        segments = tuple(Segment(info.name, info.start, info.end, by_name.get(info.name))
                         for info in header.tensors.values())
        files.append(OutputFile(path, header.file_size, header.data_start, segments))
    extra_files, skipped = _other_files(ft)
    targets = sorted(by_name.values(),
                     key=lambda t: (t.layer if t.layer is not None else -1, t.module))
    return ModelPlan(files, targets, extra_files, skipped)


def _other_files(ft: Checkpoint) -> tuple[list[tuple[str, int]], list[str]]:
    """Non-weight files to copy (config, tokenizer, generation files...) and weight files
    that are not part of the checkpoint (never copied: they would carry unprojected
    weights)."""
    weights = set(ft.files) | {INDEX_FILE}
    extra: list[tuple[str, int]] = []
    skipped: list[str] = []
    for obj in ft.storage.list(""):
        if obj.path in weights or obj.path.split("/", 1)[0] == STATE_DIR:
            continue
        if is_weight_file(obj.path):
            skipped.append(obj.path)
        elif obj.size > MAX_EXTRA_BYTES:
            logger.warning("not copying %s: %d bytes, more than a non-weight file should be",
                           ft.storage.describe(obj.path), obj.size)
            skipped.append(obj.path)
        else:
            extra.append((obj.path, obj.size))
    return extra, skipped


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectJob:
    """What a worker needs for every file of one run (hashable: workers cache on it)."""

    job_id: str
    alignment_uri: str
    alignment_id: str
    out_uri: str
    chunk_bytes: int
    prefetch: int
    #: The largest target weight of the run (sizes the pool of reused read buffers).
    max_target_bytes: int = 0


@dataclass
class _Chunk:
    view: memoryview
    buf: bytearray


@dataclass
class _Module:
    target: TargetPlan
    ft: torch.Tensor
    ft_buf: bytearray
    aligned: torch.Tensor
    aligned_buf: bytearray
    matrix: AlignmentMatrix


class FileProjector:
    """Scores and writes output files of one run on one worker (plain Python; task functions
    below run it). Keeps the run's storages, the alignment set's headers and read buffers.

    Args:
        job: The run.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, job: ProjectJob, device: str) -> None:
        self.job = job
        self.device = device
        self.aset = AlignmentSet.open(job.alignment_uri, expect=job.alignment_id)
        self.out = open_storage(job.out_uri)
        self._storages = StorageCache()
        self._lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(max_workers=3, thread_name_prefix="safelora-read")
        self._buffers = BufferPool(max_free=(job.prefetch + 2) * job.chunk_bytes)
        # A module's two weights (reading into fresh memory costs a page fault per 4 KiB:
        # slower than the read itself); as many as can be in flight.
        self._module_buffers = BufferPool(max_free=(job.prefetch + 2) * 2 * job.max_target_bytes)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def bytes_fetched(self) -> int:
        return self._storages.bytes_read + self.aset.storage.bytes_read

    # -- reads (run in the read-ahead thread) ----------------------------------------------
    def _read_module(self, t: TargetPlan) -> _Module:
        """A module's fine-tuned and aligned weights and its alignment matrix (three ranged
        reads at once)."""
        ft_buf = self._module_buffers.get(t.ft.nbytes)
        f_ft = self._pool.submit(read_ref, self._storages.get(t.ft.uri), t.ft, ft_buf)
        al_buf = self._module_buffers.get(t.aligned.nbytes)
        f_al = self._pool.submit(read_ref, self._storages.get(t.aligned.uri), t.aligned, al_buf)
        f_m = self._pool.submit(self.aset.load, t.module, self.device)
        return _Module(t, f_ft.result()[0], ft_buf, f_al.result()[0], al_buf, f_m.result())

    def _release(self, m: _Module) -> None:
        """Give a computed module's read buffers back (nothing refers to them any more)."""
        self._module_buffers.put(m.ft_buf)
        self._module_buffers.put(m.aligned_buf)

    def _chunks(self, uri: str, path: str, start: int, end: int) -> Iterator[_Chunk]:
        storage = self._storages.get(uri)
        pos = start
        while pos < end:
            n = min(self.job.chunk_bytes, end - pos)
            buf = self._buffers.get(self.job.chunk_bytes)
            view = memoryview(buf)[:n]
            storage.read_into(path, pos, view)
            yield _Chunk(view, buf)
            pos += n

    def _items(self, f: OutputFile, uri: str,
               computed: Callable[[TargetPlan], bool]) -> Iterator[_Chunk | _Module]:
        """The file's data in order: chunks of the tensors copied as they are, and the
        modules to compute (``computed(t)``: all targets in threshold mode, the selected
        ones in number mode)."""
        for seg in f.segments:
            if seg.target is not None and computed(seg.target):
                yield self._read_module(seg.target)
            else:
                yield from self._chunks(uri, f.path, seg.start, seg.end)

    # -- compute -----------------------------------------------------------------------------
    def _score(self, m: _Module) -> tuple[ResidualScore, torch.Tensor, torch.Tensor]:
        """ΔW, CΔW (float32, on the device, nn.Linear orientation) and the module's figures."""
        t = m.target
        w_al = as_linear(m.aligned.to(self.device), t.layout)
        delta = residual_delta(w_al, as_linear(m.ft.to(self.device), t.layout))
        if not bool(torch.isfinite(delta).all()):
            raise CheckpointError(f"{t.ft.describe()} − {t.aligned.describe()}: W_ft − W_aligned "
                                  "has NaN/Inf values (in one of the two checkpoints)")
        proj = m.matrix.apply(delta)
        return residual_score(delta, proj), proj, w_al

    def _row(self, f: OutputFile, m: _Module, s: ResidualScore) -> dict[str, Any]:
        t = m.target
        return {"module": t.module, "tensor": t.ft.name, "layer": t.layer, "kind": t.kind,
                "layout": t.layout, "shape": list(t.shape), "dtype": t.ft.dtype, "file": f.path,
                "form": t.form, "proj_rank": t.proj_rank, "cos": s.cos,
                "cos_rounded": s.cos_rounded, "selected": False, "norm_delta": s.norm_delta,
                "norm_projected": s.norm_projected}

    def score_file(self, f: OutputFile, cancelled: Callable[[], bool] = lambda: False
                   ) -> dict[str, Any]:
        """Phase 1 of number mode: every target module's cosine and norms (nothing written).
        ``cancelled`` is asked before each module (an interrupted run stops there)."""
        before, t0 = self.bytes_fetched(), time.perf_counter()
        rows = []
        compute_s = 0.0
        items = read_ahead((self._read_module(t) for t in f.targets), self.job.prefetch)
        for m in items:
            if cancelled():
                raise Interrupted(f"scoring {f.path} interrupted")
            t1 = time.perf_counter()
            s, _, _ = self._score(m)
            rows.append(self._row(f, m, s))
            self._release(m)
            del m
            compute_s += time.perf_counter() - t1
        return {"rows": rows, "bytes_fetched": self.bytes_fetched() - before,
                "compute_s": compute_s, "s": time.perf_counter() - t0, "device": self.device}

    def write_file(self, f: OutputFile, ft_uri: str, threshold: float | None,
                   selected: frozenset[str] | None,
                   cancelled: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Write output file ``f`` (published atomically under its name): the fine-tune's
        header bytes, then every tensor in data order, projected where selected.

        Args:
            f: The file.
            ft_uri: The fine-tuned checkpoint.
            threshold: Threshold mode: decide each module here.
            selected: Number mode: the modules the driver selected.
            cancelled: Asked before each segment: an interrupted run stops there, and the
                unpublished file is dropped.
        """
        before, t0 = self.bytes_fetched(), time.perf_counter()
        rows: list[dict[str, Any]] = []
        timings = {"compute_s": 0.0, "write_s": 0.0}
        storage = self._storages.get(ft_uri)

        def computed(t: TargetPlan) -> bool:
            return selected is None or t.module in selected

        header = storage.read_range(f.path, 0, f.data_start)
        items = read_ahead(self._items(f, ft_uri, computed), self.job.prefetch)
        with self.out.writing_file(f.path) as tmp, open(tmp, "wb") as out:
            out.write(header)
            for item in items:
                if cancelled():
                    raise Interrupted(f"writing {f.path} interrupted")
                if isinstance(item, _Chunk):
                    t1 = time.perf_counter()
                    _write_or_skip_zeros(out, item.view)
                    self._buffers.put(item.buf)
                    timings["write_s"] += time.perf_counter() - t1
                    continue
                t1 = time.perf_counter()
                t = item.target
                s, proj, w_al = self._score(item)
                row = self._row(f, item, s)
                chosen = (t.module in selected if selected is not None
                          else not math.isnan(s.cos_rounded) and s.cos_rounded <= threshold)
                data: memoryview | torch.Tensor = memoryview(item.ft_buf)
                if chosen:
                    w_out = proj.add_(w_al).to(item.ft.dtype)  # W_aligned + CΔW, its dtype
                    if not bool(torch.isfinite(w_out).all()):
                        raise CheckpointError(f"{t.ft.describe()}: W_aligned + CΔW is not "
                                              f"finite in {t.ft.dtype}")
                    # back to the stored orientation (a Conv1D's transpose is its own inverse)
                    data = as_linear(w_out, t.layout).cpu().contiguous()
                row["selected"] = chosen
                rows.append(row)
                del proj, w_al
                t2 = time.perf_counter()
                timings["compute_s"] += t2 - t1
                _write_bytes(out, data, t.ft.nbytes, t.ft.describe())
                del data
                self._release(item)
                del item
                timings["write_s"] += time.perf_counter() - t2
            out.truncate(f.size)  # a trailing hole
            if out.tell() != f.size:
                raise CheckpointError(f"{f.path}: wrote {out.tell()} bytes, expected {f.size}")
        return {"rows": rows, "bytes_fetched": self.bytes_fetched() - before,
                "bytes_written": f.size, "s": time.perf_counter() - t0, "device": self.device,
                **timings}


def _write_bytes(out: Any, data: memoryview | torch.Tensor, nbytes: int, what: str) -> None:
    if isinstance(data, torch.Tensor):
        data = memoryview(data.view(torch.uint8).numpy()).cast("B")
    if len(data) != nbytes:
        raise CheckpointError(f"{what}: {len(data)} bytes to write, expected {nbytes}")
    out.write(data)


def _write_or_skip_zeros(out: Any, view: memoryview) -> None:
    """Write a chunk, or leave a hole where it is all zeros (a sparse input stays sparse;
    the file reads back the same)."""
    n = len(view)
    if n >= 4096 and not bool(torch.frombuffer(view, dtype=torch.uint8).any()):
        out.seek(n, os.SEEK_CUR)
    else:
        out.write(view)


#: The worker slot holding the current run's :class:`FileProjector`.
PROJECT_SLOT = "project-model"


def _projector(ctx: WorkerContext, job: ProjectJob) -> FileProjector:
    return ctx.resident(PROJECT_SLOT, job, lambda: FileProjector(job, ctx.device))


def score_file(ctx: WorkerContext, job: ProjectJob, f: OutputFile) -> dict[str, Any]:
    """Task: phase 1 of number mode for one file (see :meth:`FileProjector.score_file`)."""
    return _projector(ctx, job).score_file(f, cancelled=lambda: ctx.cancelled(job.job_id))


def write_file(ctx: WorkerContext, job: ProjectJob, f: OutputFile, ft_uri: str,
               threshold: float | None, selected: frozenset[str] | None) -> dict[str, Any]:
    """Task: write one output file (see :meth:`FileProjector.write_file`)."""
    return _projector(ctx, job).write_file(f, ft_uri, threshold, selected,
                                           cancelled=lambda: ctx.cancelled(job.job_id))


def end_run(ctx: WorkerContext, job: ProjectJob) -> None:
    """Task: drop the run's projector (a session's worker moves on)."""
    ctx.drop(PROJECT_SLOT, job)


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def _read_json(storage: Storage, path: str) -> dict[str, Any] | None:
    try:
        raw = storage.read(path, max_bytes=64 * 1024**2)
    except NotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{storage.describe(path)}: not JSON: {e}") from e
    return data if isinstance(data, dict) else None


def _same_inputs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("alignment", {}).get("content_id") != b["alignment"]["content_id"]:
        return False
    if a.get("selection") != b["selection"]:
        return False
    for side in ("aligned", "finetuned"):
        x, y = a.get(side, {}), b[side]
        if x.get("files") != y["files"] or x.get("revision") != y.get("revision"):
            return False
    return True


def _check_out(out: Storage, marker: str, request: dict[str, Any],
               inputs: Sequence[Checkpoint]) -> dict[str, Any] | None:
    """What ``--out`` holds: the complete provenance to reuse, None to (over)write.

    Raises:
        ConfigError: ``--out`` is one of the inputs.
        CheckpointError: it holds a complete output of other inputs, or a checkpoint that
            this command did not write.
    """
    for ckpt in inputs:
        if out.uri.rstrip("/") == ckpt.uri.rstrip("/"):
            raise ConfigError(f"--out {out.uri} is an input checkpoint; inputs are never "
                              "modified: choose another --out")
    existing = _read_json(out, PROVENANCE_FILE)
    visible = out.exists(marker)
    if existing is None:
        ours = [o.path for o in out.list("") if o.path.endswith(".safetensors")
                or o.path in ("config.json", INDEX_FILE)]
        if ours:
            raise CheckpointError(
                f"{out.uri} already holds a checkpoint ({ours[0]}...) not written by "
                "project-model: choose another --out")
        return None
    if existing.get("format") != FORMAT:
        raise CheckpointError(f"{out.describe(PROVENANCE_FILE)}: not a {FORMAT} record")
    same = _same_inputs(existing, request)
    if visible and not same:
        raise CheckpointError(
            f"{out.uri} already holds a projected checkpoint made from other inputs "
            f"(alignment set {existing.get('alignment', {}).get('content_id')}, selection "
            f"{existing.get('selection')}); outputs are immutable: choose another --out")
    if visible and existing.get("status") == "complete":
        return existing
    return None  # an interrupted run (never visible, or being redone with the same inputs)


def _aligned_matches_set(aset: AlignmentSet, aligned: Checkpoint,
                         plan: ModelPlan) -> str:
    """Whether --aligned is the aligned model the set was built from: ``same`` (same URI and
    file versions), ``unverified`` (another URI: a copy, presumably).

    Raises:
        CheckpointError: the same URI, but its files changed since the build.
    """
    recorded = aset.metadata.get("aligned", {})
    if recorded.get("uri", "").rstrip("/") != aligned.uri.rstrip("/"):
        logger.warning("--aligned %s is not the aligned model alignment set %s was built from "
                       "(%s); assuming it is a copy of it", aligned.uri, aset.content_id,
                       recorded.get("uri"))
        return "unverified"
    files = {t.aligned.path for t in plan.targets}
    now = aligned.versions(files)
    then = recorded.get("files", {})
    changed = sorted(p for p in now if p in then and then[p] != now[p])
    if changed:
        raise CheckpointError(
            f"{aligned.uri}: {', '.join(changed[:3])} changed since alignment set "
            f"{aset.content_id} was built from it")
    return "same"


def _run_files(ex: Any, fn: Callable[..., Any], job: Any, token: str,
               files: Sequence[OutputFile], args: Callable[[OutputFile], tuple[Any, ...]],
               timeout_s: float, what: str,
               on_result: Callable[[OutputFile, dict[str, Any]], None]) -> None:
    """Run ``fn(ctx, job, file, *args(file))`` for every file, one at a time per worker,
    largest files first; a file whose worker died is run again (on that worker once Ray has
    restarted it, else on another: a lost node's worker is dropped). ``job`` may be an
    object reference (put once for all files); ``token`` is the run's job id, which an
    interrupt cancels."""
    todo = sorted(files, key=lambda f: -f.size)
    busy: set[int] = set()
    lost: dict[str, int] = {}
    pending: dict[Any, tuple[int, OutputFile]] = {}
    try:
        while todo or pending:
            for i in ex.usable():
                if todo and i not in busy:
                    f = todo.pop(0)
                    busy.add(i)
                    pending[ex.submit(i, fn, job, f, *args(f), group="stream")] = (i, f)
            h = ex.wait(list(pending), timeout_s, what)
            if h is None:  # a worker came up or was dropped
                continue
            i, f = pending.pop(h)
            busy.discard(i)
            try:
                res = ex.result(h, timeout_s)
            except WORKER_LOST as e:
                lost[f.path] = lost.get(f.path, 0) + 1
                if lost[f.path] >= MAX_LOST:
                    raise CheckpointError(f"{f.path}: its worker died {MAX_LOST} times "
                                          f"({type(e).__name__}); giving up") from e
                logger.warning("the worker writing %s died (%s); running it again", f.path,
                               type(e).__name__)
                ex.lost(i)
                todo.insert(0, f)
                continue
            on_result(f, res)
    except KeyboardInterrupt:
        # Files in flight finish (at most the grace period) or their workers are stopped;
        # temp files go with the driver's sweep, and without the index nothing is visible.
        wind_down(ex, token, list(pending))
        raise


def _copy_extras(ft: Checkpoint, out: Storage, files: Sequence[tuple[str, int]]) -> int:
    total = 0
    for path, size in files:
        data = ft.storage.read(path, max_bytes=max(size, 1) * 2 + 1024**2)
        out.put_bytes(path, data)
        total += len(data)
    return total


def _write_index(ft: Checkpoint, out: Storage, plan: ModelPlan) -> None:
    """The fine-tune's index, byte for byte when its ``total_size`` is right (the output
    files hold the same tensors), else with the total corrected."""
    raw = ft.storage.read(INDEX_FILE, max_bytes=64 * 1024**2)
    index = json.loads(raw.decode("utf-8"))
    total = sum(seg.end - seg.start for f in plan.files for seg in f.segments)
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    if meta.get("total_size") != total:
        logger.warning("%s: metadata.total_size is %s, the tensors hold %d bytes: writing "
                       "the index with the right total", ft.storage.describe(INDEX_FILE),
                       meta.get("total_size"), total)
        index["metadata"] = {**meta, "total_size": total}
        raw = (json.dumps(index, indent=2, sort_keys=False) + "\n").encode()
    out.put_bytes(INDEX_FILE, raw)


def project_model(config: FinetuneConfig) -> FinetuneResult:
    """Project a full fine-tune of the aligned model (SPEC §3) on Ray.

    Returns:
        A :class:`FinetuneResult`. If ``config.out`` already holds a complete output made
        from the same inputs (same set, file versions and selection), it is reused.

    Raises:
        CheckpointError: bad or mismatched inputs (names the tensor or file), or ``--out``
            holds something that may not be overwritten.
        AlignmentSetError: the alignment set is missing or incomplete.
        ConfigError: the set holds SaLoRA safety modules.
        LeaseHeldError: another run writes to ``out`` (and ``wait_s`` ran out).
    """
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + \
        uuid.uuid4().hex[:6]
    # Before any work; even a reuse of a complete output takes the lease, so it is writable.
    probe_outputs(config.outputs)
    # One writer per --out: what it holds is checked, swept and written by this run alone.
    lease = hold_output(open_storage(config.out), "project-model", run_id, config.wait_s)
    try:
        return _project_model(config, run_id)
    finally:
        lease.release()


def _project_model(config: FinetuneConfig, run_id: str) -> FinetuneResult:
    t_start = time.perf_counter()
    aset = AlignmentSet.open(config.alignment)
    if aset.method_family != "safelora":  # as sanitize's --method check: never silently
        raise ConfigError(
            f"{aset.uri} holds {aset.method_name} safety modules (made by safelora-ray "
            "salora-modules); project-model needs a Safe LoRA alignment set (safelora-ray "
            "build): fold adapters with `sanitize --method salora` instead")
    aligned = Checkpoint.open(config.aligned)
    ft = Checkpoint.open(config.finetuned)
    out = open_storage(config.out)
    reports = open_storage(config.reports or out.describe(STATE_DIR))
    plan = plan_model(aset, aligned, ft)
    match = _aligned_matches_set(aset, aligned, plan)
    marker = INDEX_FILE if ft.layout == "sharded" else SINGLE_FILE
    request = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "alignment": {"uri": aset.uri, "content_id": aset.content_id,
                      "method": aset.metadata.get("method", {}).get("name")},
        "aligned": aligned.source_info({t.aligned.path for t in plan.targets}),
        "finetuned": {**ft.source_info(), "extra_files": {
            p: ft.storage.version(p) for p, _ in plan.extra_files}},
        "selection": config.selection,
    }
    existing = _check_out(out, marker, request, [aligned, ft])
    result = FinetuneResult(out.uri, reports.uri, must_read_bytes=plan.must_read_bytes)
    if existing is not None:
        s = existing.get("summary", {})
        logger.info("%s already holds this projection (alignment set %s); reusing it",
                    out.uri, aset.content_id)
        result.reused = True
        result.modules = s.get("counts", {}).get("modules", 0)
        result.selected = s.get("counts", {}).get("selected", 0)
        result.tau = s.get("tau")
        result.selected_modules = list(s.get("selected_modules", []))
        result.duration_s = time.perf_counter() - t_start
        return result


    sweep_stale_writes(out)
    out.put_bytes(PROVENANCE_FILE, json.dumps(
        {**request, "status": "writing", "run_id": run_id}, indent=2).encode())
    wplan = resolve_workers(config.workers, config.use_gpu, config.ray_address,
                            small=plan.must_read_bytes <= INLINE_MAX_BUILD_BYTES, shape="device")
    ex = open_executor(wplan.take(max(1, len(plan.files))), config.use_gpu)
    try:
        ex.check_shared([("--out", config.out, True), ("--alignment", config.alignment, False),
                         ("--aligned", config.aligned, False),
                         ("--finetuned", config.finetuned, False)])
    except BaseException:
        ex.close(False)
        raise
    job = ProjectJob(uuid.uuid4().hex, aset.uri, aset.content_id, out.uri, config.chunk_bytes,
                     config.prefetch, max((max(t.ft.nbytes, t.aligned.nbytes)
                                           for t in plan.targets), default=0))
    logger.info("projecting %d target modules of %s (%d file(s), %.2f GB) with alignment set "
                "%s (%s) on %d %s worker(s) → %s", len(plan.targets), ft.uri, len(plan.files),
                plan.weights_bytes / 1e9, aset.content_id, config.selection, ex.size, ex.kind,
                out.uri)
    # Non-weight files first: without its weights marker the output is not a checkpoint.
    extra_bytes = _copy_extras(ft, out, plan.extra_files)
    stats = {"score_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
    fetched = [0]
    rows: dict[str, dict[str, Any]] = {}
    device = "cpu"
    ok = False
    try:
        selected: frozenset[str] | None = None
        tau = config.threshold
        if config.num_proj_layers is not None:
            t0 = time.perf_counter()
            scored = [f for f in plan.files if f.targets]
            bar = Progress("score", "module", total=len(plan.targets),
                           enabled=config.progress)

            def scored_one(f: OutputFile, r: dict[str, Any]) -> None:
                fetched[0] += r["bytes_fetched"]
                stats["compute_s"] += r["compute_s"]
                for row in r["rows"]:
                    rows[row["module"]] = row
                bar.update(len(r["rows"]))

            try:
                _run_files(ex, score_file, ex.put(job), job.job_id, scored, lambda f: (),
                           config.task_timeout_s, "scored file", scored_one)
            finally:
                bar.close()
            chosen = select_modules({m: r["cos_rounded"] for m, r in rows.items()},
                                    num_proj_layers=config.num_proj_layers,
                                    strict=config.strict_k)
            selected = frozenset(chosen)
            finite = sorted(r["cos_rounded"] for r in rows.values()
                            if not math.isnan(r["cos_rounded"]))
            tau = finite[min(config.num_proj_layers, len(finite)) - 1] if finite else None
            stats["score_s"] = time.perf_counter() - t0
        bar = Progress("project-model", "B", total=plan.weights_bytes, unit_scale=True,
                       enabled=config.progress)

        def written(f: OutputFile, r: dict[str, Any]) -> None:
            nonlocal device
            fetched[0] += r["bytes_fetched"]
            device = r["device"]
            for k in ("compute_s", "write_s"):
                stats[k] += r[k]
            for row in r["rows"]:
                rows[row["module"]] = row  # number mode: the selected ones, rescored
            bar.update(f.size)

        try:
            _run_files(ex, write_file, ex.put(job), job.job_id, plan.files,
                       lambda f: (ft.uri, config.threshold, selected), config.task_timeout_s,
                       "output file", written)
        finally:
            bar.close()
        ok = True
    finally:
        if ok and not ex.owns_workers:
            ex.notify(end_run, job)
        ex.close(ok)
        # A worker killed mid-file leaves its temp file beside the target; no writer is left.
        try:
            sweep_stale_writes(out)
        except Exception as e:  # never mask the run's own outcome
            logger.warning("could not remove stale temp files under %s: %s", out.uri, e)
    if selected is not None:
        for m, row in rows.items():
            row["selected"] = m in selected
    if config.threshold is not None and len(rows) != len(plan.targets):
        raise CheckpointError(f"scored {len(rows)} of {len(plan.targets)} target modules")

    result.modules = len(rows)
    result.selected_modules = sorted(m for m, r in rows.items() if r["selected"])
    result.selected = len(result.selected_modules)
    result.tau = tau
    # Everything fetched from the inputs: the driver's index/header/config reads + workers'.
    result.bytes_read = (fetched[0] + aset.storage.bytes_read + aligned.storage.bytes_read
                         + ft.storage.bytes_read)
    result.bytes_written = plan.weights_bytes
    result.workers = 0 if ex.in_process else ex.size
    result.device = device
    result.stats = stats
    result.duration_s = time.perf_counter() - t_start
    summary = _summary(config, result, aset, ft, plan, match, run_id, extra_bytes)
    ordered = sorted(rows.values(), key=lambda r: (r["layer"] if r["layer"] is not None else -1,
                                                   r["module"]))
    write_reports(reports, ordered, summary)
    out.put_bytes(PROVENANCE_FILE, json.dumps(
        {**request, "status": "complete", "run_id": run_id, "summary": summary},
        indent=2, ensure_ascii=False).encode())
    if ft.layout == "sharded":
        _write_index(ft, out, plan)  # last: its presence makes the output a checkpoint
    logger.info("projected %d of %d modules (τ = %s) into %s in %.1f s; reports at %s",
                result.selected, result.modules, tau, out.uri, result.duration_s, reports.uri)
    return result


def _summary(config: FinetuneConfig, result: FinetuneResult, aset: AlignmentSet,
             ft: Checkpoint, plan: ModelPlan, match: str, run_id: str,
             extra_bytes: int) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "alignment": {"uri": aset.uri, "content_id": aset.content_id,
                      "method": aset.metadata.get("method", {}), "targets": aset.targets},
        "aligned": {"uri": open_storage(config.aligned).uri, "matches_set": match},
        "finetuned": {"uri": ft.uri, "layout": ft.layout, "files": len(plan.files)},
        "out": result.uri,
        "selection": config.selection,
        "tau": result.tau,
        "counts": {"modules": result.modules, "selected": result.selected,
                   "files": len(plan.files), "extra_files": len(plan.extra_files)},
        "selected_modules": result.selected_modules,
        "skipped_files": plan.skipped_files,
        "bytes": {"read": result.bytes_read, "must_read": result.must_read_bytes,
                  "read_ratio": round(result.bytes_read / max(1, result.must_read_bytes), 5),
                  "weights_written": result.bytes_written, "extra_written": extra_bytes},
        "duration_s": round(result.duration_s, 3),
        "workers": result.workers,
        "device": result.device,
        "stats": {k: round(v, 3) for k, v in result.stats.items()},
    }


__all__ = [
    "FileProjector",
    "FinetuneConfig",
    "FinetuneResult",
    "end_run",
    "plan_model",
    "project_model",
    "read_ahead",
    "score_file",
    "write_file",
]

