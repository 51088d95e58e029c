"""The products of a sanitize: C B and the scores' sums, for many adapters at once, next to
the one copy of the alignment set a GPU or a node keeps.

An I/O worker groups a batch's modules by (module, B's dtype, A's dtype, rank): per group,
the stacked B (n x d_out x r) and A (n x r x d_in), in the adapters' dtypes. The products are
C B in B's dtype and the n x 4 score sums (:func:`~safelora_ray.core.scores.gram_sums`), from
G = A Aᵀ: all the rule needs of A. G is formed by the engine on the set's device, beside the
products: on a GPU node the I/O worker's CPU never does the float64 arithmetic (2.5-4.5 ms of
CPU per 7B adapter otherwise). Where the products are computed depends on the node:

- **On the set's own device** (every node by default, see
  :mod:`~safelora_ray.pipelines.sanitize.shared_set`): each I/O worker computes its own
  products with the one copy its node or GPU keeps (object store pages, or the holder's GPU
  memory through CUDA IPC).
- **By a holder** (``SAFELORA_GPU_PRODUCTS=holder``, or a GPU that cannot share its memory):
  the I/O workers send it their groups. A :class:`ProjectionService` coalesces the requests
  of every I/O worker of its node for a few milliseconds and runs them as one: one matrix
  product per module for hundreds of adapters, the inputs staged in pinned host memory and
  copied asynchronously, and a single synchronisation per batch (none per module).

The same :class:`ProjectionEngine` runs everywhere, in-process jobs included, with fixed-width
products: every path gives the same bits.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from safelora_ray.core.alignment import AlignmentMatrix
from safelora_ray.core.errors import AlignmentSetError, ClusterError, SafeLoraError
from safelora_ray.core.once import OnceMap
from safelora_ray.core.scores import lora_gram, project_stack
from safelora_ray.core.validate import env_number
from safelora_ray.execution import REJOIN_TIMEOUT_S, WorkerContext, wait_back
from safelora_ray.execution.device import to_host
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.set_cache import evict, local_copy

logger = logging.getLogger(__name__)

#: A group of a request: (module, B's dtype name, A's dtype name, rank).
GroupKey = tuple[str, str, str, int]
#: Tensors of a group: B (n x d_out x r) and A (n x r x d_in) in, each in its own dtype; C B
#: (n x d_out x r, B's dtype) and the score sums (n x 4, float64) out.
Pair = tuple[torch.Tensor, torch.Tensor]

#: Adapters one coalesced product may hold, and how long the first request waits for others.
MAX_COALESCED = env_number("SAFELORA_COALESCE_MAX", 512, int)
LINGER_S = env_number("SAFELORA_COALESCE_LINGER_S", 0.004)
#: Largest request an I/O worker sends a holder: a batch's groups go in parts of at most
#: this many bytes, so that what is in flight through Ray's object store stays bounded by
#: I/O workers x batches in flight x 2 x this, whatever the batch size and adapter size.
MAX_REQUEST_BYTES = env_number("SAFELORA_REQUEST_MAX_BYTES", 16 * 1024**2, int)
#: The worker slot of a holder's service (one set resident at a time).
SERVICE_SLOT = "projection"
#: Benchmarks only (``bench_fleet.py --null-product``): the product is replaced by a copy of B
#: on the set's device and scores of cosine 1, so the same bytes (A and B) travel the same way
#: with the engine's arithmetic, G = A Aᵀ included, gone (what is left is the data path's own
#: cost).
NULL_PRODUCT = os.environ.get("SAFELORA_BENCH_NULL_PRODUCT") == "1"


class HolderLost(SafeLoraError):
    """The worker holding the alignment set for this I/O worker died and did not come back.

    Attributes:
        waited: The I/O worker already waited for Ray to restart it (the driver need not).
    """

    def __init__(self, message: str, waited: bool = False) -> None:
        super().__init__(message)
        self.waited = waited


@dataclass(frozen=True)
class SetKey:
    """An alignment set by URI *and* content id: a set rebuilt at the same URI is another."""

    uri: str
    content_id: str


class MatrixCache:
    """An alignment set's matrices on one device, each loaded on first use, once (several
    threads, and several runs against the same set in one worker, share it).

    Args:
        aset: The opened alignment set.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, aset: AlignmentSet, device: str,
                 matrices: dict[str, AlignmentMatrix] | None = None) -> None:
        self.aset = aset
        self.device = device
        self._matrices: OnceMap[str, AlignmentMatrix] = OnceMap((matrices or {}).items())
        #: The matrices are views of the node's object store (a :class:`MappedSet`), not a
        #: copy of this process's own.
        self.mapped = matrices is not None
        self._source: AlignmentSet | None = None  # where modules are read from (see _read)
        self._source_lock = threading.Lock()

    @classmethod
    def open(cls, key: SetKey, device: str) -> MatrixCache:
        """Open the set at ``key.uri``, checking it is still the set ``key`` names."""
        return cls(AlignmentSet.open(key.uri, expect=key.content_id), device)

    def get(self, module: str) -> AlignmentMatrix:
        return self._matrices.get(module, lambda: self._read(module))

    def _read(self, module: str) -> AlignmentMatrix:
        """The module read from the node's copy of a set on an object store (made by the
        first read: a GPU holder reads a nightly set from the node's disk, not from the
        object store every night), else from the set itself; a copy found damaged is
        removed and the set itself read from then on."""
        with self._source_lock:
            if self._source is None:
                self._source = local_copy(self.aset)
            source = self._source
        try:
            return source.load(module, device=self.device)
        except AlignmentSetError as e:
            if source is self.aset:
                raise
            with self._source_lock:
                if self._source is source:
                    evict(source, str(e))
                    self._source = self.aset
        return self.aset.load(module, device=self.device)

    def load_all(self) -> None:
        """Load every module now (a holder warms up while the I/O workers read)."""
        for module in self.aset.rows:
            self.get(module)

    @property
    def nbytes(self) -> int:
        """Bytes of the matrices loaded (for a mapped set: the pages it may map)."""
        return sum(m.tensor.numel() * m.tensor.element_size() for m in self._matrices.values())


class ProjectionEngine:
    """Runs groups of products on the set's device (see the module docstring)."""

    def __init__(self, matrices: MatrixCache) -> None:
        self.matrices = matrices
        self.cuda = matrices.device.startswith("cuda")

    def run(self, groups: dict[GroupKey, Pair]) -> dict[GroupKey, Pair]:
        """C B and the score sums of every group; outputs on the CPU."""
        if not self.cuda:
            return self._run(groups)
        # The set's GPU is made current in the calling thread (an I/O worker sees every GPU
        # of its node, and each of its threads starts on GPU 0): the copies, products and
        # the synchronisation below go to that GPU's stream.
        with torch.cuda.device(torch.device(self.matrices.device)):
            out = self._run(groups)
            torch.cuda.current_stream().synchronize()  # once per batch
        return out

    def _run(self, groups: dict[GroupKey, Pair]) -> dict[GroupKey, Pair]:
        out: dict[GroupKey, Pair] = {}
        for key, (b, a) in groups.items():
            matrix = self.matrices.get(key[0])
            if self.cuda:  # asynchronous copies from pinned memory: no stall per module
                b, a = _pinned(b), _pinned(a)
            if NULL_PRODUCT:
                cb, sums = null_stack(matrix, b, a)
            else:
                g = lora_gram(a.to(matrix.tensor.device, non_blocking=True))
                cb, sums = project_stack(matrix, b, g)
            if self.cuda:
                cb = to_host(cb)
                sums = to_host(sums)
            out[key] = (cb, sums)
        return out


def null_stack(matrix: AlignmentMatrix, b: torch.Tensor, a: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`NULL_PRODUCT`'s stand-in for G and :func:`project_stack`: A and B copied to the
    matrix's device, B back as "C B", with sums that score a cosine of 1 (nothing drifts)."""
    a.to(matrix.tensor.device, non_blocking=True)  # A's trip a real G takes; G itself is gone
    cb = b.to(matrix.tensor.device, non_blocking=True).clone()
    sums = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64,
                        device=cb.device).expand(b.shape[0], 4)
    return cb, sums


def _pinned(t: torch.Tensor) -> torch.Tensor:
    if t.is_pinned():  # coalesced: concatenated into pinned memory already
        return t
    # The caching host allocator reuses pinned blocks: no cudaHostAlloc per call.
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged


@dataclass
class _Pending:
    groups: dict[GroupKey, Pair]
    n: int
    future: cf.Future[dict[GroupKey, Pair]]


class ProjectionService:
    """A holder's engine shared by the I/O workers of its node: requests arriving within
    :data:`LINGER_S` of each other (up to :data:`MAX_COALESCED` adapters) run as one batch.

    Args:
        engine: The engine, with the set resident on the device.
    """

    def __init__(self, engine: ProjectionEngine, max_adapters: int = MAX_COALESCED,
                 linger_s: float = LINGER_S) -> None:
        self.engine = engine
        self.max_adapters = max_adapters
        self.linger_s = linger_s
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="safelora-projection",
                                        daemon=True)
        self._thread.start()
        self.batches = 0
        self.adapters = 0

    def submit(self, groups: dict[GroupKey, Pair]) -> dict[GroupKey, Pair]:
        """Run ``groups`` (with whatever else arrives meanwhile); blocks until done."""
        n = max((b.shape[0] for b, _ in groups.values()), default=0)
        fut: cf.Future[dict[GroupKey, Pair]] = cf.Future()
        self._queue.put(_Pending(groups, n, fut))
        return fut.result()

    def close(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            total = first.n
            deadline = time.monotonic() + self.linger_s
            while total < self.max_adapters:
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
                total += item.n
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        merged: dict[GroupKey, list[Pair]] = {}
        for p in batch:
            for key, pair in p.groups.items():
                merged.setdefault(key, []).append(pair)
        try:
            groups = {k: (_cat([b for b, _ in v], self.engine.cuda),
                          _cat([a for _, a in v], self.engine.cuda))
                      if len(v) > 1 else v[0] for k, v in merged.items()}
            out = self.engine.run(groups)
        except BaseException as e:  # every waiting caller gets the error
            for p in batch:
                p.future.set_exception(e)
            return
        self.batches += 1
        self.adapters += sum(p.n for p in batch)
        offsets: dict[GroupKey, int] = dict.fromkeys(merged, 0)
        for p in batch:
            mine = {}
            for key, (b, _) in p.groups.items():
                lo = offsets[key]
                hi = lo + b.shape[0]
                cb, sums = out[key]
                mine[key] = (cb[lo:hi], sums[lo:hi])
                offsets[key] = hi
            p.future.set_result(mine)


def _cat(parts: list[torch.Tensor], pinned: bool) -> torch.Tensor:
    """The requests' tensors as one (for a GPU straight into pinned memory: one copy)."""
    if not pinned:
        return torch.cat(parts)
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=True))


# ---------------------------------------------------------------------------------------------
# Shipping groups between processes: numpy arrays (zero-copy out of Ray's object store)
# ---------------------------------------------------------------------------------------------

_VIEW = {torch.bfloat16: torch.int16}  # numpy has no bfloat16: ship its bits


def pack(groups: dict[GroupKey, Pair]) -> dict[GroupKey, tuple[np.ndarray, np.ndarray]]:
    """Groups as numpy arrays (bfloat16 as its bits: the dtypes are in each key, or implied:
    the sums are float64)."""
    return {key: (_numpy(x), _numpy(y)) for key, (x, y) in groups.items()}


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return t.view(_VIEW.get(t.dtype, t.dtype)).numpy()


def unpack(groups: dict[GroupKey, tuple[np.ndarray, np.ndarray]], copy: bool = False,
           answer: bool = False) -> dict[GroupKey, Pair]:
    """The inverse of :func:`pack` for a request (``answer``: for its answer, C B and the
    float64 sums). Read-only arrays from the object store are wrapped, not copied (nothing
    writes to them), unless ``copy``: then the store's copy can be freed at once rather than
    when the tensors die."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        for key, (x, y) in groups.items():
            if copy:
                x, y = np.array(x, copy=True), np.array(y, copy=True)
            out[key] = (_tensor(x, key[1]),
                        torch.from_numpy(y) if answer else _tensor(y, key[2]))
    return out


def _tensor(x: np.ndarray, dtype_name: str) -> torch.Tensor:
    dtype = getattr(torch, dtype_name)
    t = torch.from_numpy(x)
    return t.view(dtype) if t.dtype != dtype else t


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Task functions on a holder, and the I/O side's projectors
# ---------------------------------------------------------------------------------------------


def holder_service(ctx: WorkerContext, key: SetKey) -> ProjectionService:
    def make() -> ProjectionService:
        # On a GPU, coalescing makes products of hundreds of adapters; a holder computing on
        # the CPU (a GPU actor where torch sees no CUDA device) gains nothing by waiting.
        linger = LINGER_S if ctx.device.startswith("cuda") else 0.0
        return ProjectionService(ProjectionEngine(MatrixCache.open(key, ctx.device)),
                                 linger_s=linger)

    return ctx.resident(SERVICE_SLOT, key, make)


def project_request(ctx: WorkerContext, key: SetKey,
                    groups: dict[GroupKey, tuple[np.ndarray, np.ndarray]]
                    ) -> dict[GroupKey, tuple[np.ndarray, np.ndarray]]:
    """Task (``serve`` group): the products of an I/O worker's batch, coalesced with those of
    the node's other I/O workers."""
    return pack(holder_service(ctx, key).submit(unpack(groups)))


Projector = Callable[[dict[GroupKey, Pair]], dict[GroupKey, Pair]]


def split_groups(groups: dict[GroupKey, Pair], max_bytes: int
                 ) -> list[dict[GroupKey, Pair]]:
    """``groups`` in parts of at most ``max_bytes`` (a larger single group is a part alone).
    Products are computed per group with fixed-width columns, so the parts' answers are the
    bits the whole would have given."""
    parts: list[dict[GroupKey, Pair]] = []
    part: dict[GroupKey, Pair] = {}
    size = 0
    for k, (b, a) in groups.items():
        n = b.numel() * b.element_size() + a.numel() * a.element_size()
        if part and size + n > max_bytes:
            parts.append(part)
            part, size = {}, 0
        part[k] = (b, a)
        size += n
    if part:
        parts.append(part)
    return parts


def ask_holder(holder: Any, timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on ``holder`` (an actor of this node), its log records relayed. If the
    holder dies mid-call, the call is made again once Ray has restarted it; if it does not
    come back within :data:`~safelora_ray.execution.workers.REJOIN_TIMEOUT_S`,
    :class:`HolderLost`."""
    from safelora_ray.execution import WORKER_LOST, Relayed, relay
    from safelora_ray.execution.ray_utils import get_unwrapped

    for attempt in (1, 2):
        ref = holder.call.options(concurrency_group="serve").remote(fn, *args)
        try:
            out = get_unwrapped(ref, timeout_s)
            if isinstance(out, Relayed):  # the holder's log records go on with ours
                relay(out.records)
                out = out.result
            return out
        except WORKER_LOST as e:
            if attempt == 2:
                raise HolderLost(f"the worker holding the alignment set died twice during "
                                 f"one call ({type(e).__name__})") from None
            why = wait_back(holder, REJOIN_TIMEOUT_S)
            if why is not None:
                raise HolderLost(f"the worker holding the alignment set died: {why}",
                                 waited=True) from None
    raise ClusterError("unreachable")  # pragma: no cover


def remote_projector(holder: Any, key: SetKey, timeout_s: float) -> Projector:
    """Products computed by ``holder`` (a GPU holder of this node), in requests of at most
    :data:`MAX_REQUEST_BYTES` (see :func:`ask_holder` for a holder that dies)."""

    def call(groups: dict[GroupKey, Pair]) -> dict[GroupKey, Pair]:
        out: dict[GroupKey, Pair] = {}
        for part in split_groups(groups, MAX_REQUEST_BYTES):
            # Copied out: the holder's store frees the answer when this returns, not when
            # this batch has been written.
            out.update(unpack(ask_holder(holder, timeout_s, project_request, key, pack(part)),
                              copy=True, answer=True))
        return out

    return call


__all__ = [
    "GroupKey",
    "HolderLost",
    "MatrixCache",
    "ProjectionEngine",
    "ProjectionService",
    "Projector",
    "SetKey",
    "ask_holder",
    "dtype_name",
    "holder_service",
    "pack",
    "project_request",
    "remote_projector",
    "split_groups",
    "unpack",
]
