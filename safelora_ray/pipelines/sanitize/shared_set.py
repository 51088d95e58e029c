"""One copy of the alignment set per node (CPU) or per GPU, shared by every I/O worker there,
each of which computes its own products with it.

- **CPU-only nodes**: the node's first I/O worker shares the set (:class:`SharedSet`), once;
  every I/O worker of the node maps those same pages (zero-copy, read-only:
  :class:`MappedSet`). A set whose shards are files on the node (a local set) is mapped from
  them: its pages are the page cache's, checked once by the sharing worker against the
  manifest's digests; the others map the files after checking that they are the very files
  it checked (device, inode, size, mtime). A set on an object store is mapped from the
  node's copy of it on disk (:mod:`~safelora_ray.formats.set_cache`), and put in the node's
  Ray object store only where that copy cannot be made. Mapping saves the copy: 4 GiB of
  fresh shared memory for a 7B set, faulted in page by page at every run's start (8-40 s of
  CPU on a 2-core VM against 0.5-2.4 s). An in-process run maps the files the same way.
- **GPU nodes** (``SAFELORA_GPU_PRODUCTS=workers``, the default): the holder (one actor per
  GPU) loads the set on its GPU and exports CUDA IPC handles of its tensors; each I/O worker
  of the node opens them (the same GPU memory, no copy) and runs its own batch's products on
  that GPU. A batch's B travels disk → I/O worker → GPU → I/O worker → disk and never
  through the holder, whose CPU would otherwise cap the node (it touched every adapter's B
  about five times: 17.8 ms of CPU per 7B adapter on an H100 node, ~3,400 adapters/min).
  A holder on a GPU that cannot export IPC handles (a MIG slice), or on another node, serves
  the I/O worker's products itself, as ``SAFELORA_GPU_PRODUCTS=holder`` does everywhere
  (:func:`~safelora_ray.pipelines.sanitize.projection.remote_projector`).
- A fake GPU (a GPU actor where torch sees no CUDA device, as in the CPU proxy of the GPU
  node, ``bench_fleet.py --fake-gpu``) shares its set as a CPU node does: the I/O side runs
  exactly as on a GPU node.

Because every engine computes fixed-width products, each of these gives the bits of an
in-process run.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safelora_ray.core.alignment import AlignmentMatrix
from safelora_ray.core.errors import AlignmentSetError, ConfigError, SafeLoraError, StorageError
from safelora_ray.core.validate import env_number
from safelora_ray.execution import REJOIN_TIMEOUT_S, WorkerContext
from safelora_ray.execution.placement import NodeInfo
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.set_cache import (
    CACHE_ENV,
    CopyCancelled,
    cache_root,
    evict,
    local_copy,
)
from safelora_ray.pipelines.sanitize.projection import (
    GroupKey,
    HolderLost,
    MatrixCache,
    Pair,
    ProjectionEngine,
    Projector,
    SetKey,
    ask_holder,
    holder_service,
    remote_projector,
)
from safelora_ray.storage.localfs import FileIdentity, map_readonly

logger = logging.getLogger(__name__)

#: The worker slot of a node's shared (or mapped) set.
SHARED_SLOT = "shared-set"
#: The slot of a GPU holder's exported handles (beside its service, which keeps the tensors).
EXPORT_SLOT = "set-export"
#: Threads that check a mapped set's modules against their digests (see :func:`_views`).
CHECK_THREADS = min(4, max(2, os.cpu_count() or 2))
#: Largest share of a CPU-only node's object store the set may take (the rest carries the
#: run's other objects): a larger set is refused before the run starts (the set cache off).
STORE_SHARE = env_number("SAFELORA_SET_STORE_SHARE", 0.6)
#: Where a GPU node's products run: ``workers`` (each I/O worker, on the holder's GPU memory
#: through CUDA IPC) or ``holder`` (the holder computes every I/O worker's batch: one process
#: per GPU touches every adapter). Read by the driver only.
GPU_PRODUCTS = os.environ.get("SAFELORA_GPU_PRODUCTS", "workers")


def check_gpu_products() -> str:
    """:data:`GPU_PRODUCTS`, validated.

    Raises:
        ConfigError: an unknown value.
    """
    if GPU_PRODUCTS not in ("workers", "holder"):
        raise ConfigError(f"SAFELORA_GPU_PRODUCTS={GPU_PRODUCTS!r}: expected 'workers' (each "
                          "I/O worker computes on the holder's GPU memory) or 'holder'")
    return GPU_PRODUCTS


def check_store_room(aset: AlignmentSet, nodes: Sequence[NodeInfo]) -> None:
    """Refuse a run whose set cannot be held in the object store of a CPU-only node it uses,
    where the node would keep it there: a set of local files is mapped from them, and a set
    on an object store from each node's copy on its disk while the set cache is on (then a
    set too large for a store is only warned about: a node without room for the copy would
    put it in its store, spilling).

    Raises:
        ConfigError: naming the set, its size, the node and its object store.
    """
    if aset.local_shards() is not None:
        return
    need = sum(4 * math.prod(r.stored_shape) for r in aset.rows.values())
    for n in nodes:
        if n.store_bytes and need > STORE_SHARE * n.store_bytes:
            what = (f"alignment set {aset.uri} ({need / 2**30:.2f} GiB of matrices) does not "
                    f"fit the Ray object store of node {n.address} "
                    f"({n.store_bytes / 2**30:.2f} GiB; at most {STORE_SHARE:.0%} of it)")
            if cache_root() is not None:
                logger.warning("%s: its workers map the node's copy of the set on its disk "
                               "(%s); a node without room for the copy would spill it from "
                               "its object store", what, CACHE_ENV)
                return
            raise ConfigError(
                f"{what}, where a CPU-only node keeps the set with its copy on disk turned off "
                f"({CACHE_ENV}): turn it on, start its Ray with a larger "
                "--object-store-memory, or sanitize on GPU nodes")


@dataclass(frozen=True)
class SetHandles:
    """How an I/O worker reaches a holder's set.

    Attributes:
        kind: ``store`` (object refs of numpy arrays in the node's object store), ``file``
            (the set's local shard files, mapped), ``cuda-ipc`` (``torch.multiprocessing``
            reductions of the holder's GPU tensors) or ``none`` (the holder cannot share:
            ``why`` says why; its products are asked of it).
        refs: Per module, an object ref (``store``), ``(shard, offset, length)`` (``file``)
            or ``(rebuild, args)`` (``cuda-ipc``).
        node_id: The holder's node (IPC handles open on that node only).
        pid: The holder's process: the handles are valid while it lives.
        device_uuid: The holder's GPU (``cuda-ipc``), found among the I/O worker's devices.
        why: Why ``none``.
        files: Per shard (``file``), its path and the identity of the file the holder checked.
    """

    kind: str
    refs: dict[str, Any] = field(default_factory=dict)
    node_id: str | None = None
    pid: int = 0
    device_uuid: str | None = None
    why: str | None = None
    files: dict[str, tuple[str, FileIdentity]] = field(default_factory=dict)


class SharedSet:
    """An alignment set shared on this node by its holder, which then computes with the
    shared pages itself; it owns them (the objects, or the mappings) as long as its slot
    lives. See the module docstring for the two ways.

    Args:
        handles: What an I/O worker of the node needs to map the same pages.
        matrices: The mapped matrices, for this worker's own batches.
        nbytes: Bytes shared.
    """

    def __init__(self, handles: SetHandles, matrices: MatrixCache, nbytes: int) -> None:
        self.handles = handles
        self.engine = ProjectionEngine(matrices)
        self.nbytes = nbytes

    @classmethod
    def put(cls, key: SetKey) -> SharedSet:
        t0 = time.perf_counter()
        aset = AlignmentSet.open(key.uri, expect=key.content_id)
        shared = cls.map_local(aset) or cls._put_store(aset)
        logger.info("alignment set %s shared on this node (%s): %d module(s), %.1f MiB in "
                    "%.2f s", key.content_id,
                    "its files mapped" if shared.handles.kind == "file"
                    else "put in the object store",
                    len(aset.rows), shared.nbytes / 2**20, time.perf_counter() - t0)
        return shared

    @classmethod
    def map_local(cls, aset: AlignmentSet, cancelled: Callable[[], bool] | None = None
                  ) -> SharedSet | None:
        """The set's files on this node mapped: its own (a local set), or this node's copy of
        a set on an object store (:mod:`~safelora_ray.formats.set_cache`; ``cancelled``: see
        its ``local_copy``); None where there are none to map (the cache off or out of room,
        a filesystem that cannot map)."""
        local = local_copy(aset, cancelled)
        paths = local.local_shards()
        if paths is None:
            return None
        try:
            return cls._map_files(local, paths)
        except StorageError as e:  # a filesystem that cannot map files: read them
            logger.warning("alignment set %s: its files cannot be mapped (%s); they are read",
                           aset.content_id, e)
        except AlignmentSetError as e:
            if local is aset:
                raise
            evict(local, str(e))  # the node's copy went bad: the set is read
        return None

    @classmethod
    def _put_store(cls, aset: AlignmentSet) -> SharedSet:
        import ray

        refs: dict[str, Any] = {}
        nbytes = 0
        # One read buffer for every module (each is copied into the store at once): its
        # pages are touched once, not once per module.
        scratch = bytearray(max((4 * math.prod(r.stored_shape) for r in aset.rows.values()),
                                default=0))
        for module in aset.rows:
            m = aset.load(module, scratch=scratch)
            refs[module] = ray.put(m.tensor.numpy())
            nbytes += m.tensor.numel() * m.tensor.element_size()
            del m
        handles = SetHandles("store", refs, node_id=_node_id(), pid=os.getpid())
        return cls(handles, _mapped(aset, refs, REJOIN_TIMEOUT_S), nbytes)

    @classmethod
    def _map_files(cls, aset: AlignmentSet, paths: dict[str, str]) -> SharedSet:
        refs = {module: aset.stored_range(module) for module in aset.rows}
        maps, files = {}, {}
        for shard, path in paths.items():
            mapping, identity = map_readonly(path)
            maps[shard] = memoryview(mapping)
            files[shard] = (path, identity)
        handles = SetHandles("file", refs, _node_id(), os.getpid(), files=files)
        # Checked here, against the manifest's digests, once for the node.
        matrices = _views(aset, refs, maps, verify=True)
        return cls(handles, matrices, sum(n for _, _, n in refs.values()))


def _shared(ctx: WorkerContext, key: SetKey) -> SharedSet:
    return ctx.resident(SHARED_SLOT, key, lambda: SharedSet.put(key))


def _views(aset: AlignmentSet, refs: dict[str, tuple[str, int, int]],
           maps: dict[str, memoryview], verify: bool) -> MatrixCache:
    """The set's matrices as views of its shards mapped here (the page cache's pages).

    Checked (``verify``), the modules are summed in :data:`CHECK_THREADS` threads: where the
    pages are not yet in the page cache (a node's copy just written, around it), each thread
    waits on the disk for its page faults while another sums, and the check of a 2 GiB set
    takes ~1 s of wall time instead of ~3 s (the sums release the GIL)."""
    def view(item: tuple[str, tuple[str, int, int]]) -> tuple[str, AlignmentMatrix]:
        module, (shard, start, n) = item
        return module, aset.from_bytes(module, maps[shard][start:start + n], verify=verify)

    if not verify or len(refs) < 2:
        return MatrixCache(aset, "cpu", dict(map(view, refs.items())))
    with cf.ThreadPoolExecutor(min(CHECK_THREADS, len(refs)),
                               thread_name_prefix="safelora-check") as pool:
        return MatrixCache(aset, "cpu", dict(pool.map(view, refs.items())))


def _open_files(aset: AlignmentSet, handles: SetHandles) -> MatrixCache:
    """The holder's files mapped here, if they are still the files it checked.

    Raises:
        StorageError: a file is not the one the holder checked (replaced or rewritten since),
            or cannot be mapped.
    """
    maps = {}
    for shard, (path, identity) in handles.files.items():
        mapping, now = map_readonly(path)
        if now != identity:
            raise StorageError(f"{path} changed since the worker holding alignment set "
                               f"{aset.content_id} checked it ({identity} → {now})")
        maps[shard] = memoryview(mapping)
    return _views(aset, handles.refs, maps, verify=False)


def _mapped(aset: AlignmentSet, refs: dict[str, Any], timeout_s: float) -> MatrixCache:
    """The set's matrices as views of the object store's pages (``ray.get`` of a numpy array
    maps it read-only, without a copy)."""
    import ray

    arrays = ray.get(list(refs.values()), timeout=timeout_s) if refs else []
    matrices = {}
    with warnings.catch_warnings():
        # "the given NumPy array is not writable": nothing writes to an alignment matrix
        warnings.simplefilter("ignore", UserWarning)
        for module, arr in zip(refs, arrays, strict=True):
            row = aset.rows[module]
            matrices[module] = AlignmentMatrix(
                row.form, torch.from_numpy(arr), row.norm)  # type: ignore[arg-type]
    return MatrixCache(aset, "cpu", matrices)


# ---------------------------------------------------------------------------------------------
# GPU holders: CUDA IPC handles of the set on the GPU
# ---------------------------------------------------------------------------------------------


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _export_cuda(ctx: WorkerContext, key: SetKey) -> SetHandles:
    """The set on this holder's GPU (its service's copy: one per GPU) as IPC handles."""
    from torch.multiprocessing.reductions import reduce_tensor

    matrices = holder_service(ctx, key).engine.matrices
    matrices.load_all()
    refs = {}
    try:
        for module in matrices.aset.rows:
            refs[module] = reduce_tensor(matrices.get(module).tensor)
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    except (RuntimeError, AttributeError) as e:  # e.g. a MIG slice: no CUDA IPC
        logger.warning("the alignment set on this GPU cannot be shared through CUDA IPC "
                       "(%s): this holder computes its I/O workers' products", e)
        return SetHandles("none", node_id=_node_id(), pid=os.getpid(), why=str(e))
    return SetHandles("cuda-ipc", refs, _node_id(), os.getpid(), uuid)


def _handles(ctx: WorkerContext, key: SetKey) -> SetHandles:
    if ctx.device.startswith("cuda"):
        return ctx.resident(EXPORT_SLOT, key, lambda: _export_cuda(ctx, key))
    return _shared(ctx, key).handles


def share_set(ctx: WorkerContext, key: SetKey) -> SetHandles:
    """Task (``serve`` group, on a holder): how this holder's set is reached, sharing it the
    first time (a CPU node's holder, or a fake GPU's: the object store; a GPU's: IPC)."""
    return _handles(ctx, key)


def holder_pid(ctx: WorkerContext) -> int:
    """Task (``serve`` group): the holder's process (its IPC handles die with it)."""
    return os.getpid()


def warm_set(ctx: WorkerContext, key: SetKey, share: bool = False) -> int:
    """Task: load the set onto this holder's device now (``share``: and share it with the
    node's I/O workers, see :func:`share_set`); returns its bytes (0: the set could not be
    loaded)."""
    try:
        if share and not ctx.device.startswith("cuda"):
            return _shared(ctx, key).nbytes
        if share:
            _handles(ctx, key)
        svc = holder_service(ctx, key)
        svc.engine.matrices.load_all()
        return svc.engine.matrices.nbytes
    except SafeLoraError as e:
        # Nobody reads this call's result: a broken set (a corrupt shard) is reported by the
        # first batch that needs it, in one line, instead of as Ray's unhandled-error trace.
        logger.debug("alignment set %s not loaded ahead: %s", key.content_id, e)
        return 0


def _cuda_index(uuid: str | None) -> int:
    """This process's index of the GPU with ``uuid`` (an I/O worker sees the node's GPUs)."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"GPU {uuid} is not visible to this process "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def _open_cuda(aset: AlignmentSet, handles: SetHandles) -> MatrixCache:
    """The holder's GPU tensors, opened here through their IPC handles (no copy)."""
    index = _cuda_index(handles.device_uuid)
    torch.cuda.set_device(index)  # this thread; the engine makes it current in every other
    matrices = {}
    for module, (rebuild, args) in handles.refs.items():
        params = list(inspect.signature(rebuild).parameters)
        args = list(args)
        args[params.index("storage_device")] = index  # the holder's index is its own view's
        row = aset.rows[module]
        matrices[module] = AlignmentMatrix(row.form, rebuild(*args), row.norm)
    return MatrixCache(aset, f"cuda:{index}", matrices)


class HolderRestarted(SafeLoraError):
    """The holder's process changed under a batch that used its GPU memory."""


class MappedSet:
    """A holder's set as an I/O worker sees it: the node's shared pages (its object store's,
    or the set's files', mapped read-only) or the holder's GPU memory (CUDA IPC), and an
    engine computing this worker's products with them; or, when the holder cannot share, its
    products asked of the holder.

    Args:
        key: The set.
        aset: Its metadata (this worker's sanitizer opened it: forms and norms).
        holder: The holder actor (a CPU node's first I/O worker, or a GPU's holder).
        timeout_s: Bound on asking the holder and mapping the objects.
    """

    def __init__(self, key: SetKey, aset: AlignmentSet, holder: Any, timeout_s: float
                 ) -> None:
        self.holder = holder
        self.timeout_s = timeout_s
        self.handles: SetHandles = ask_holder(holder, timeout_s, share_set, key)
        self.engine: ProjectionEngine | None = None
        self.fallback: Projector | None = None
        h = self.handles
        why = h.why
        if h.kind == "store":
            self.engine = ProjectionEngine(_mapped(aset, h.refs, timeout_s))
        elif h.kind in ("file", "cuda-ipc") and h.node_id != _node_id():
            why = "the holder is on another node"
        elif h.kind == "file":
            try:
                self.engine = ProjectionEngine(_open_files(aset, h))
            except SafeLoraError as e:
                why = f"its files do not map here: {e}"
        elif h.kind == "cuda-ipc":
            try:
                self.engine = ProjectionEngine(_open_cuda(aset, h))
            except (RuntimeError, ValueError) as e:
                why = f"its CUDA IPC handles do not open here: {e}"
        if self.engine is None:
            logger.warning("alignment set %s: %s; its holder computes this worker's products",
                           key.content_id, why)
            self.fallback = remote_projector(holder, key, timeout_s)

    def run(self, groups: dict[GroupKey, Pair]) -> dict[GroupKey, Pair]:
        if self.engine is None:
            assert self.fallback is not None
            return self.fallback(groups)
        out = self.engine.run(groups)
        if self.handles.kind == "cuda-ipc":
            # IPC memory is valid while its exporter lives: a holder that died (and came
            # back as another process) during the products may have left garbage in them.
            pid = ask_holder(self.holder, self.timeout_s, holder_pid)
            if pid != self.handles.pid:
                raise HolderRestarted(f"the worker holding the alignment set restarted (pid "
                                      f"{self.handles.pid} → {pid}) while a batch used its "
                                      "GPU memory")
        return out


def shared_projector(ctx: WorkerContext, holder: Any | None, key: SetKey,
                     aset: AlignmentSet, timeout_s: float) -> Projector:
    """Products computed here with the shared set: put in the object store by this worker
    (``holder`` None: it is a CPU node's first I/O worker) or shared by ``holder``. The set
    is found on the first call, once the batch's adapters are read: a worker starting its
    first batch reads while the holder is still loading it. ``aset``: the set's metadata,
    already opened here."""

    def run(groups: dict[GroupKey, Pair]) -> dict[GroupKey, Pair]:
        if holder is None:
            return _shared(ctx, key).engine.run(groups)
        for attempt in (1, 2):
            mapped = ctx.resident(SHARED_SLOT, key,
                                  lambda: MappedSet(key, aset, holder, timeout_s))
            try:
                return mapped.run(groups)
            except HolderRestarted as e:
                ctx.drop(SHARED_SLOT)  # map the new holder's set, and compute again
                if attempt == 2:
                    raise HolderLost(str(e)) from None
                logger.warning("%s: computing the batch again with its new copy", e)
        raise AssertionError("unreachable")  # pragma: no cover

    return run


def local_projector(ctx: WorkerContext, key: SetKey, aset: AlignmentSet,
                    fallback: Callable[[], Projector],
                    cancelled: Callable[[], bool] | None = None) -> Projector | None:
    """The driver's process on the CPU (an in-process run): products computed with the set's
    files mapped, as a CPU node's workers do (its own files, or this node's copy of a set on
    an object store), not with a copy of it in this process's memory; ``fallback``'s where
    nothing can be mapped (the sanitizer's own engine, which loads the set). None on a GPU.

    The set is mapped when a batch's products first need it, not before: a node's first
    run reads its first batches' adapters while the set is copied to the node (begun by
    :func:`map_set` as the run starts). A node's copy being made when ``cancelled`` says so
    is given up (:class:`~safelora_ray.formats.set_cache.CopyCancelled` raised)."""
    if ctx.device != "cpu":
        return None

    def run(groups: dict[GroupKey, Pair]) -> dict[GroupKey, Pair]:
        shared = _mapped_here(ctx, key, aset, cancelled)
        return (fallback() if shared is _UNMAPPED else shared.engine.run)(groups)

    return run


def map_set(ctx: WorkerContext, key: SetKey, run_id: str | None = None) -> bool:
    """Task (an in-process run on the CPU, as it starts): map the set here now, the node's
    copy of a set on an object store made first where there is none, while the run lists its
    outputs and reads its first adapters; a copy given up once run ``run_id`` is cancelled.
    False where nothing was mapped (a GPU, the cache off, the run stopped, a broken set:
    reported by the first batch that needs it, in one line)."""
    if ctx.device != "cpu":
        return False
    try:
        stop = None if run_id is None else (lambda: ctx.cancelled(run_id))
        return _mapped_here(ctx, key, cancelled=stop) is not _UNMAPPED
    except (SafeLoraError, CopyCancelled) as e:
        logger.debug("alignment set %s not mapped ahead: %s", key.content_id, e)
        return False


def _mapped_here(ctx: WorkerContext, key: SetKey, aset: AlignmentSet | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Any:
    def share() -> Any:
        opened = aset or AlignmentSet.open(key.uri, expect=key.content_id)
        return SharedSet.map_local(opened, cancelled) or _UNMAPPED

    return ctx.resident(SHARED_SLOT, key, share)


_UNMAPPED: Any = object()


__all__ = ["EXPORT_SLOT", "GPU_PRODUCTS", "SHARED_SLOT", "STORE_SHARE", "MappedSet",
           "SetHandles", "SharedSet", "check_gpu_products", "check_store_room", "holder_pid",
           "local_projector", "map_set", "share_set", "shared_projector", "warm_set"]
