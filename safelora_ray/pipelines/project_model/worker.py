"""project-model's worker side: :class:`FileProjector` streams one output file at a time, and
the task functions the driver sends to workers (see :mod:`.driver`).

A worker streams its file: a reader thread fetches the next items ahead (a bounded queue)
while the current one is written: a non-target tensor as ranged-read chunks of
``chunk_bytes`` (never whole; all-zero chunks become holes of the output), a target module as
its fine-tuned and aligned weights plus the module's alignment matrix (ranged reads). A worker
holds a few chunks and a few modules, whatever the model's size.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from safelora_ray.core.alignment import AlignmentMatrix, as_linear
from safelora_ray.core.errors import CheckpointError, Interrupted
from safelora_ray.core.scores import ResidualScore, residual_delta, residual_score
from safelora_ray.execution import WorkerContext
from safelora_ray.execution.buffers import BufferPool
from safelora_ray.execution.prefetch import read_ahead
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.checkpoint import read_ref
from safelora_ray.pipelines.project_model.config import ProjectJob
from safelora_ray.planning.model_plan import OutputFile, TargetPlan
from safelora_ray.storage import open_storage
from safelora_ray.storage.cache import StorageCache

logger = logging.getLogger(__name__)


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


__all__ = ["PROJECT_SLOT", "FileProjector", "end_run", "score_file", "write_file"]
