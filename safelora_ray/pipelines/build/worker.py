"""The worker side of a build: one shard's output files, built module by module.

Each worker (a :class:`~safelora_ray.execution.actor.SafeLoraWorker` actor, or this process
on a machine with no Ray cluster: see :mod:`safelora_ray.execution.resolve`) streams its
modules: a reader thread fetches the next modules' base and aligned tensors (ranged reads)
while the current one is computed, so a worker holds only a few modules in memory whatever
the model size. Output files are written to a local temp file with a precomputed safetensors
header, then published atomically.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safelora_ray.core.alignment import as_linear, check_norm, start_alignment
from safelora_ray.core.errors import CheckpointError, Interrupted
from safelora_ray.execution import WorkerContext
from safelora_ray.execution.buffers import BufferPool
from safelora_ray.execution.device import to_host
from safelora_ray.execution.prefetch import read_ahead
from safelora_ray.formats.alignment_set import FORMAT, ManifestRow
from safelora_ray.formats.checkpoint import read_ref
from safelora_ray.formats.integrity import (
    DIGEST_CHUNK,
    DIGEST_SCHEME,
    FileHasher,
)
from safelora_ray.formats.integrity import tree_digest as source_digest
from safelora_ray.formats.safetensors import SafetensorsWriter
from safelora_ray.planning.plan import FilePlan, ModulePlan
from safelora_ray.storage import open_storage
from safelora_ray.storage.cache import StorageCache

logger = logging.getLogger(__name__)


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
    """Builds the output files of one shard; plain Python (kept in a worker's slot by
    :func:`build_file`).

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
        self.first_read_at: float | None = None  # wall clock: the build's start-up share
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
        if self.first_read_at is None:
            self.first_read_at = time.time()
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
            "first_read_at": self.first_read_at,
            **timings,
            "device": self.device,
        }


#: Worker slots holding a build's shard builders: ``build:<shard>`` (a worker that takes over
#: the files of a lost worker's shard keeps its own shard's builder beside it).
BUILD_SLOT = "build:"


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


__all__ = ["BUILD_SLOT", "DIGEST_CHUNK", "DIGEST_SCHEME", "ShardBuilder", "build_file",
           "end_build", "source_digest"]
