"""The execution layer: where pipeline work runs, on worker actors spread over the cluster's
nodes or in this process. It sits below the pipelines (build, sanitize, ...) and knows none of
them.

A pipeline's work is a *task function* ``fn(context, *args)``, a module-level function of the
pipeline's module (shipped to workers by reference). It runs on a worker against a
:class:`WorkerContext`: the device the worker computes on and *slots* of state kept between
calls (a shard builder's reader threads, an alignment set resident on the GPU).
:class:`WorkerCore` holds that context; :class:`SafeLoraWorker` is the core as a Ray actor.

Workers are planned per node (:mod:`safelora_ray.execution.placement`) and pinned to their node. The
pipelines' driver loops talk to an *executor*:

- :class:`RayExecutor` runs on worker actors. A worker whose process dies is restarted by Ray
  on its node; a worker whose node is lost (or that cannot come back within
  :data:`REJOIN_TIMEOUT_S`) is dropped, and the run goes on with the others. A worker that is
  not up within :data:`START_TIMEOUT_S` is dropped too: work starts on the first ready worker
  and never waits on one that cannot be placed. Inside :func:`worker_session` the actors are
  shared by every call (a nightly run builds and then sanitizes several catalogs on the same
  warm workers, with the alignment set already resident); outside one, each call starts its
  own and stops them when it returns, so no cluster resource stays held.
- :class:`InlineExecutor` runs in the driver process (``workers=0``, like PyTorch's
  ``DataLoader(num_workers=0)``), and is what ``workers=None`` picks for a small job when no
  Ray cluster is configured: starting a private local Ray (4-7 s) and worker processes that
  import torch (~2 s) would cost more than the job.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
import torch

from safelora_ray.core.alignment import full_precision_matmul
from safelora_ray.core.errors import ClusterError, ConfigError
from safelora_ray.core.interrupts import grace_left
from safelora_ray.core.validate import env_number
from safelora_ray.execution.placement import (
    NodeInfo,
    WorkerSpec,
    describe_plan,
    plan_device_workers,
    plan_pipeline,
)
from safelora_ray.execution.ray_utils import (
    ensure_ray,
    get_unwrapped,
    pick_device,
    worker_runtime_env,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Exceptions that mean a worker process (or its node) died: its call may have been lost
#: with it, or its result (stored on the lost node).
WORKER_LOST: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
    ray.exceptions.ActorUnschedulableError, ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError)

#: A sanitize job of at most this many adapters runs in this process when no cluster is
#: configured (``workers=None``). On 2 cores the break-even against a private local Ray is
#: ~700 adapters; bigger machines gain more from Ray's processes, so the bar is lower.
INLINE_MAX_ADAPTERS = 256
#: The same for a build: target bytes of the pair (a ~1B-parameter pair's q/v).
INLINE_MAX_BUILD_BYTES = 2 * 1024**3
#: Seconds a new worker may take to come up (placed, started, torch imported) before it is
#: dropped; the run proceeds with the workers that did.
START_TIMEOUT_S = env_number("SAFELORA_WORKER_START_TIMEOUT_S", 180)
#: Seconds a worker whose process died may take to be restarted on its node before it is
#: dropped (a lost node's workers are dropped at once).
REJOIN_TIMEOUT_S = env_number("SAFELORA_WORKER_REJOIN_TIMEOUT_S", 60)


class WorkerContext:
    """What a task function sees of the worker it runs on: the device it computes on, its
    node, and state kept between calls.

    State lives in named *slots*, one object per slot: asking a slot for another key drops the
    object it held (calling its ``close()`` if it has one) before the factory makes the new
    one, so a 70B alignment set is never resident twice. Thread-safe; each slot has its own
    lock, so a slow factory (loading a set) does not hold up the other slots.

    Args:
        device: ``cpu`` or ``cuda``.
        node_id: The Ray node this worker runs on (None in this process).
    """

    def __init__(self, device: str, node_id: str | None = None) -> None:
        self.device = device
        self.node_id = node_id
        self._cancelled: set[str] = set()
        self._slots: dict[str, tuple[Hashable, Any]] = {}
        self._locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(
            threading.Lock)
        self._lock = threading.Lock()

    def _slot_lock(self, slot: str) -> threading.Lock:
        with self._lock:
            return self._locks[slot]

    def resident(self, slot: str, key: Hashable, factory: Callable[[], T]) -> T:
        """The object held in ``slot`` for ``key``, made by ``factory`` when the slot holds
        nothing or another key's object (which is dropped first)."""
        with self._slot_lock(slot):
            held = self._slots.get(slot)
            if held is not None and held[0] == key:
                return held[1]
            if held is not None:
                self._slots.pop(slot)
                _close(held[1])
            obj = factory()
            self._slots[slot] = (key, obj)
            return obj

    def cancel(self, token: str) -> None:
        """Ask the tasks of run ``token`` to stop at their next safe point (after the adapter
        or module in progress): an interrupted run leaves nothing half-written."""
        self._cancelled.add(token)

    def cancelled(self, token: str) -> bool:
        """Whether run ``token`` was cancelled (tasks poll this between units of work)."""
        return token in self._cancelled

    def peek(self, slot: str) -> tuple[Hashable, Any] | None:
        """``(key, object)`` held in ``slot``, or None."""
        return self._slots.get(slot)

    def slots(self) -> list[str]:
        """The names of the slots holding something."""
        return list(self._slots)

    def drop(self, slot: str, key: Hashable | None = None) -> None:
        """Drop (and close) what ``slot`` holds; only if it is ``key``'s when given."""
        with self._slot_lock(slot):
            held = self._slots.get(slot)
            if held is not None and (key is None or held[0] == key):
                self._slots.pop(slot)
                _close(held[1])

    def close(self) -> None:
        """Drop every slot."""
        for slot in list(self._slots):
            self.drop(slot)


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        try:
            close()
        except Exception as e:  # housekeeping: never fail the call that replaced it
            logger.warning("closing %s failed: %s", type(obj).__name__, e)


class WorkerCore:
    """One worker's state between calls (plain Python; :class:`SafeLoraWorker` wraps it):
    a :class:`WorkerContext` that task functions run against.

    Args:
        device: ``cpu`` or ``cuda``.
        node_id: The node it runs on.
    """

    def __init__(self, device: str, node_id: str | None = None) -> None:
        self.device = device
        self.context = WorkerContext(device, node_id)

    def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(context, *args)`` here."""
        return fn(self.context, *args)


def _configure_process(num_gpus: float) -> str:
    device = pick_device(num_gpus)
    if device == "cpu":
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        torch.set_num_threads(cpus)
    full_precision_matmul()  # no TF32: SPEC equality needs full float32 products
    return device


#: Concurrency groups of a worker, and threads each: ``stream`` runs one call at a time (a
#: build shard's files are read in order by one prefetch thread); ``batch`` runs two (one
#: batch reads and writes, I/O releasing the GIL, while the other computes); ``serve`` answers
#: the I/O workers of its node (a holder's products: requests wait there to be coalesced).
GROUPS = {"stream": 1, "batch": 2, "serve": 64}
#: Cancellation and health checks reach a worker through their own group, never queued
#: behind the work.
CONTROL_GROUP = "control"
#: Log records relayed per call at most (a task that logs in a loop must not flood the driver).
MAX_RELAYED = 200


class _Relay(logging.Handler):
    """Collects the ``safelora_ray`` log records a call emits, to send them back with its
    result: the driver prints them in order, once, and never after its final summary (Ray's
    own log forwarding is asynchronous and prints every line with a prefix).

    Records of the call's own thread go with its result. Records of threads that belong to
    no call (the helper threads a call starts: a build's reader and writer, the S3 range
    reads, a holder's projection thread) go with the next result this worker sends, so that
    they reach the driver too instead of the worker's log file only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._others: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        item = (record.name, record.levelno, record.getMessage())
        buf = getattr(self._local, "records", None)
        if buf is None:
            with self._lock:
                if len(self._others) < MAX_RELAYED:
                    self._others.append(item)
        elif len(buf) < MAX_RELAYED:
            buf.append(item)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[str, int, str]]]:
        self._local.records = records = []
        try:
            yield records
        finally:
            self._local.records = None
            with self._lock:
                others, self._others = self._others, []
            records.extend(others[:max(0, MAX_RELAYED - len(records))])


@dataclass(frozen=True)
class Relayed:
    """A worker call's result and the log records it emitted."""

    result: Any
    records: list[tuple[str, int, str]]


def relay(records: Sequence[tuple[str, int, str]]) -> None:
    """Emit a worker's log records here, under their own logger names."""
    for name, level, message in records:
        logging.getLogger(name).log(level, "%s", message)


# Ray restarts a dead worker process on its node, without limit: each death is an event the
# driver sees (a poison adapter fails alone, the worker serves the rest). Calls are never
# retried by Ray: the driver decides what to run again, and where (a batch in flight on a
# lost node goes to another node; a retried batch's adapters are found in the ledger).
@ray.remote(max_restarts=-1, max_task_retries=0,
            concurrency_groups={**GROUPS, CONTROL_GROUP: 1})
class SafeLoraWorker:
    """A worker process: runs task functions (``fn(context, *args)``) for the pipelines.

    Args:
        num_gpus: The GPU share it was given (0: a CPU worker).
        log_level: The driver's ``safelora_ray`` log level (``--log-level`` reaches workers).
    """

    def __init__(self, num_gpus: float, log_level: int = logging.INFO) -> None:
        pkg = logging.getLogger("safelora_ray")
        pkg.setLevel(log_level)
        self._relay = _Relay()
        pkg.addHandler(self._relay)
        self.core = WorkerCore(_configure_process(num_gpus),
                               ray.get_runtime_context().get_node_id())

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ready(self) -> str:
        """The device this worker computes on (answers once the process is up)."""
        return self.core.device

    def call(self, fn: Callable[..., Any], *args: Any) -> Relayed:
        """Run ``fn(context, *args)`` (dispatched into a group with ``.options``)."""
        with self._relay.capture() as records:
            result = self.core.call(fn, *args)
        return Relayed(result, records)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def cancel(self, token: str) -> None:
        """Stop the tasks of run ``token`` at their next safe point."""
        self.core.context.cancel(token)


# ---------------------------------------------------------------------------------------------
# The cluster's nodes
# ---------------------------------------------------------------------------------------------


def live_nodes() -> list[NodeInfo]:
    """The cluster's live nodes that can run workers (some CPU or GPU), in a stable order."""
    out = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        if not n.get("Alive") or (res.get("CPU", 0) <= 0 and res.get("GPU", 0) <= 0):
            continue
        out.append(NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"),
                            float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                            float(res.get("object_store_memory", 0))))
    return sorted(out, key=lambda x: (x.address, x.node_id))


def _pinned(node_id: str | None) -> dict[str, Any]:
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Hard affinity: a worker lives and dies with its node (never re-placed elsewhere, where
    # it could wait forever for room on a full cluster).
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


# ---------------------------------------------------------------------------------------------
# Worker sessions: actors shared by the calls made inside one
# ---------------------------------------------------------------------------------------------


class WorkerSession:
    """Worker actors kept between calls, each for its resources (node, CPUs, GPU share): a
    call reuses the matching actors and stops the others, so they never hold what the new
    ones need."""

    def __init__(self) -> None:
        self._actors: list[tuple[tuple[Any, ...], Any]] = []
        self._lock = threading.Lock()

    def acquire(self, specs: Sequence[WorkerSpec], runtime_env: dict[str, Any]) -> list[Any]:
        """One actor per spec, reusing the running ones that match."""
        with self._lock:
            spare = list(self._actors)
            kept: list[tuple[tuple[Any, ...], Any]] = []
            for spec in specs:
                key = _actor_key(spec, runtime_env)
                match = next((x for x in spare if x[0] == key), None)
                if match is not None:
                    spare.remove(match)
                    kept.append(match)
                else:
                    kept.append((key, _start_actor(spec, runtime_env)))
            for _, handle in spare:  # not needed by this call: free what they hold
                _kill(handle)
            self._actors = kept
            return [handle for _, handle in kept]

    def add(self, specs: Sequence[WorkerSpec], runtime_env: dict[str, Any]) -> list[Any]:
        """New actors for ``specs`` beside the running ones (replacements, new nodes)."""
        with self._lock:
            new = [(_actor_key(spec, runtime_env), _start_actor(spec, runtime_env))
                   for spec in specs]
            self._actors.extend(new)
        return [handle for _, handle in new]

    def forget(self, handle: Any) -> None:
        """Stop ``handle`` (a dropped worker) and never hand it out again."""
        with self._lock:
            self._actors = [x for x in self._actors if x[1] != handle]
        _kill(handle)

    def shutdown(self) -> None:
        """Stop every worker of the session."""
        with self._lock:
            actors, self._actors = self._actors, []
        if ray.is_initialized():
            for _, handle in actors:
                _kill(handle)


def _actor_key(spec: WorkerSpec, runtime_env: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a running actor fit ``spec`` in this job: its class (tests substitute a
    crashing one, looked up at call time), resources, environment, job and log level."""
    level = logging.getLogger("safelora_ray").getEffectiveLevel()
    return (id(SafeLoraWorker), *spec.resources, json.dumps(runtime_env, sort_keys=True),
            ray.get_runtime_context().get_job_id(), level)


def _start_actor(spec: WorkerSpec, runtime_env: dict[str, Any]) -> Any:
    level = logging.getLogger("safelora_ray").getEffectiveLevel()
    return SafeLoraWorker.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                                  runtime_env=runtime_env,
                                  **_pinned(spec.node_id)).remote(spec.num_gpus, level)


def _kill(handle: Any) -> None:
    with contextlib.suppress(Exception):
        ray.kill(handle, no_restart=True)


_session: WorkerSession | None = None
_session_lock = threading.Lock()


@contextlib.contextmanager
def worker_session() -> Iterator[WorkerSession]:
    """Share worker actors between the build and sanitize calls made inside the block.

    Workers start once (importing torch takes seconds) and keep the alignment set they last
    used resident (on the GPU when they have one); they are stopped when the block exits.
    Nested blocks share the outer session.

    Example::

        with worker_session():
            build(BuildConfig(...))
            sanitize(SanitizeConfig(...))
    """
    global _session
    with _session_lock:
        outer = _session
        if outer is None:
            _session = WorkerSession()
        session = _session
    assert session is not None
    try:
        yield session
    finally:
        if outer is None:
            with _session_lock:
                _session = None
            session.shutdown()


# ---------------------------------------------------------------------------------------------
# Executors: what the driver loops of the pipelines talk to
# ---------------------------------------------------------------------------------------------


@dataclass
class WorkerSlot:
    """One worker of an executor.

    Attributes:
        spec: What it was planned as (node, resources, role, holder).
        handle: The actor (Ray) or None (this process).
        state: ``starting`` → ``ready``; ``dropped`` once lost for good.
        device: ``cpu`` / ``cuda`` once ready.
    """

    spec: WorkerSpec
    handle: Any
    state: str = "starting"
    device: str = "cpu"
    started_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class WorkerPlan:
    """Where a call runs: ``specs`` empty means this process."""

    specs: tuple[WorkerSpec, ...]
    nodes: tuple[NodeInfo, ...] = ()

    @property
    def in_process(self) -> bool:
        return not self.specs

    @property
    def uses_gpu(self) -> bool:
        return any(s.num_gpus > 0 for s in self.specs)

    @property
    def num_workers(self) -> int:
        return len(self.specs)

    def take(self, n: int) -> WorkerPlan:
        """The first ``n`` workers, taken from the nodes in turn (a build with fewer shards
        than planned workers still spreads over the nodes)."""
        if n >= len(self.specs):
            return self
        by_node: dict[str | None, list[WorkerSpec]] = {}
        for spec in self.specs:
            by_node.setdefault(spec.node_id, []).append(spec)
        order: list[WorkerSpec] = []
        while len(order) < n:
            for specs in by_node.values():
                if specs and len(order) < n:
                    order.append(specs.pop(0))
        return WorkerPlan(tuple(order), self.nodes)


class RayExecutor:
    """Runs task functions on worker actors planned per node (those of the active
    :func:`worker_session`, else actors of its own, stopped by :meth:`close`).

    Indices name the workers of the plan, in order; :meth:`usable` says which can take work
    now. A handle returned by :meth:`wait` is one of those :meth:`submit` returned, or None
    when only the workers changed (one came up, or was dropped): the driver loop then hands
    out work again.
    """

    in_process = False

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.owns_workers = _session is None
        self.session = _session if _session is not None else WorkerSession()
        handles = self.session.acquire(plan.specs, worker_runtime_env())
        self.slots = [WorkerSlot(spec, h) for spec, h in zip(plan.specs, handles, strict=True)]
        self._starting: dict[Any, int] = {s.handle.ready.remote(): i
                                          for i, s in enumerate(self.slots)}
        self._calls: dict[Any, int] = {}
        logger.info("workers: %s", describe_plan(plan.specs, plan.nodes))

    # -- the workers ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def kind(self) -> str:
        return "GPU" if self.plan.uses_gpu else "CPU"

    def usable(self, role: str | None = None) -> list[int]:
        """Indices of the ready workers (of ``role``: ``io``, ``holder``, ``device``)."""
        return [i for i, s in enumerate(self.slots) if s.state == "ready"
                and (role is None or _has_role(s.spec, role))]

    def alive(self, role: str | None = None) -> list[int]:
        """Indices of the workers not dropped (ready or still starting)."""
        return [i for i, s in enumerate(self.slots) if s.state != "dropped"
                and (role is None or _has_role(s.spec, role))]

    def handle(self, i: int) -> Any:
        return self.slots[i].handle

    def holder_index(self, i: int) -> int | None:
        """The index of worker ``i``'s holder (None when ``i`` holds the set itself)."""
        spec = self.slots[i].spec
        if spec.holds_set:
            return None
        if spec.holder is not None and self.slots[spec.holder].state != "dropped":
            return spec.holder
        others = sorted(self.alive("holder"),
                        key=lambda j: self.slots[j].spec.node_id != spec.node_id)
        if not others:
            raise ClusterError("every worker that held the alignment set was lost")
        return others[0]

    def holder_of(self, i: int) -> Any | None:
        """The holder actor worker ``i`` sends its products to; None when ``i`` holds the set
        itself. A dropped holder is replaced by another live one (its own node's first).

        Raises:
            ClusterError: no holder is left.
        """
        h = self.holder_index(i)
        return None if h is None else self.slots[h].handle

    def _mark_ready(self, ref: Any) -> None:
        i = self._starting.pop(ref)
        slot = self.slots[i]
        try:
            slot.device = ray.get(ref, timeout=10)
            slot.state = "ready"
        except Exception as e:
            self._drop(i, f"it failed to start ({type(e).__name__}: {e})")

    def _drop(self, i: int, why: str, replace: bool = True) -> None:
        slot = self.slots[i]
        if slot.state == "dropped":
            return
        slot.state = "dropped"
        self.session.forget(slot.handle)
        added = self._replace(slot.spec) if replace else None
        logger.warning("dropping worker %d (%s on node %s): %s; going on with %d worker(s)%s",
                       i, slot.spec.role, (slot.spec.node_id or "-")[:12], why,
                       len(self.alive()) - (added is not None),
                       "" if added is None else f", and a new one (worker {added}) on node "
                       f"{self.slots[added].spec.node_id[:12]} where there is room")
        if not self.alive():
            raise ClusterError(f"no worker is left: the last one was dropped because {why}")

    def _free(self) -> dict[str, tuple[float, float]]:
        """CPUs and GPUs of each live node not taken by this executor's workers (other jobs'
        use is not known here: a replacement that finds no room is dropped after
        :data:`START_TIMEOUT_S`)."""
        free = {n.node_id: [n.cpus, n.gpus] for n in live_nodes()}
        for s in self.slots:
            if s.state != "dropped" and s.spec.node_id in free:
                free[s.spec.node_id][0] -= s.spec.num_cpus
                free[s.spec.node_id][1] -= s.spec.num_gpus
        return {k: (c, g) for k, (c, g) in free.items()}

    def _replace(self, lost: WorkerSpec) -> int | None:
        """A worker like ``lost`` on a node with room for it, if any (a cluster with spare
        capacity keeps its size; a full one goes on smaller)."""
        try:
            free = self._free()
        except Exception as e:  # the cluster view is best effort
            logger.debug("no cluster view for a replacement: %s", e)
            return None
        fits = [(c, nid) for nid, (c, g) in free.items() if nid != lost.node_id
                and c >= lost.num_cpus - 1e-9 and g >= lost.num_gpus - 1e-9]
        if not fits or lost.role == "holder":
            return None  # holders only come with their node (see grow)
        node = max(fits)[1]
        role, holder = lost.role, None
        if lost.does_io:
            mine = [j for j in self.alive("holder") if self.slots[j].spec.node_id == node]
            role, holder = ("io", mine[0]) if mine else ("holder+io", None)
        return self._add([WorkerSpec(node, lost.num_cpus, lost.num_gpus, role, holder)])[0]

    def _add(self, specs: Sequence[WorkerSpec]) -> list[int]:
        handles = self.session.add(specs, worker_runtime_env())
        first = len(self.slots)
        for spec, h in zip(specs, handles, strict=True):
            self.slots.append(WorkerSlot(spec, h))
            self._starting[h.ready.remote()] = len(self.slots) - 1
        return list(range(first, len(self.slots)))

    def grow(self, plan_node: Callable[[NodeInfo], list[WorkerSpec]]) -> int:
        """Workers on nodes that joined the cluster since the run started (an autoscaler
        adding nodes): ``plan_node`` plans a new node's workers (holder indices relative to
        that node's list). Returns how many were added."""
        known = {n.node_id for n in self.plan.nodes} | {s.spec.node_id for s in self.slots}
        added = 0
        for node in live_nodes():
            if node.node_id in known:
                continue
            specs = plan_node(node)
            base = len(self.slots)
            specs = [WorkerSpec(s.node_id, s.num_cpus, s.num_gpus, s.role,
                                None if s.holder is None else base + s.holder) for s in specs]
            self._add(specs)
            self.plan = WorkerPlan(self.plan.specs, (*self.plan.nodes, node))
            added += len(specs)
            logger.info("node %s joined the cluster: %d more worker(s)", node.address,
                        len(specs))
        return added

    def lost(self, i: int, gone: str | None = None) -> bool:
        """After a call on worker ``i`` failed because its process died: wait (bounded) for
        Ray to restart it on its node. Returns whether it is back; if not it is dropped (a
        lost node's workers at once), and its work must go elsewhere. ``gone``: someone
        already waited and gave up (why): drop it without waiting again."""
        slot = self.slots[i]
        if slot.state == "dropped":
            return False
        back = gone if gone is not None else wait_back(slot.handle, REJOIN_TIMEOUT_S)
        if back is None:
            return True
        self._drop(i, back)
        return False

    # -- calls ---------------------------------------------------------------------------------
    def put(self, value: Any) -> Any:
        """Ship ``value`` to the object store once (passed to many calls)."""
        return ray.put(value)

    def submit(self, i: int, fn: Callable[..., Any], *args: Any, group: str = "batch") -> Any:
        """Run ``fn(context, *args)`` on worker ``i`` in concurrency group ``group``."""
        ref = self.slots[i].handle.call.options(concurrency_group=group).remote(fn, *args)
        self._calls[ref] = i
        return ref

    def worker_of(self, handle: Any) -> int:
        """The worker a call was submitted to."""
        return self._calls[handle]

    def wait(self, handles: Sequence[Any], timeout_s: float, what: str) -> Any | None:
        """The next finished call of ``handles``, or None when a worker came up or was
        dropped first (then ``handles`` may hold calls that wait on nobody)."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            for ref, i in list(self._starting.items()):
                if now - self.slots[i].started_at > START_TIMEOUT_S:
                    self._starting.pop(ref)
                    self._drop(i, f"it was not up within {START_TIMEOUT_S:.0f} s (no room on "
                                  "its node?)", replace=False)
                    return None
            refs = list(handles) + list(self._starting)
            if not refs:
                raise ClusterError("no worker is left to wait for")
            step = min(deadline - now, 5.0) if self._starting else deadline - now
            ready, _ = ray.wait(refs, num_returns=1, timeout=max(step, 0.0))
            if ready:
                ref = ready[0]
                if ref in self._starting:
                    self._mark_ready(ref)
                    return None
                return ref
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {what} finished within {timeout_s:.0f} s")

    def result(self, handle: Any, timeout_s: float) -> Any:
        """The call's return value; raises one of :data:`WORKER_LOST` if its worker died.
        The log records the call emitted on its worker are emitted here first."""
        self._calls.pop(handle, None)
        out = get_unwrapped(handle, timeout_s)
        if isinstance(out, Relayed):
            relay(out.records)
            return out.result
        return out

    def notify(self, fn: Callable[..., Any], *args: Any, group: str = "stream",
               role: str | None = None) -> None:
        """Run ``fn(context, *args)`` on every live worker (of ``role``) without waiting."""
        for i in self.alive(role):
            with contextlib.suppress(Exception):
                self.slots[i].handle.call.options(concurrency_group=group).remote(fn, *args)

    def cancel(self, token: str, timeout_s: float = 10.0) -> None:
        """Ask every worker to stop the tasks of run ``token`` at their next safe point."""
        refs = []
        for i in self.alive():
            with contextlib.suppress(Exception):
                refs.append(self.slots[i].handle.cancel.remote(token))
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)

    def drain(self, handles: Sequence[Any], timeout_s: float) -> list[Any]:
        """Wait up to ``timeout_s`` for ``handles`` to finish (results ignored); returns those
        still running."""
        if not handles:
            return []
        _, left = ray.wait(list(handles), num_returns=len(handles), timeout=timeout_s)
        return left

    def stop(self, handles: Sequence[Any], timeout_s: float = 30.0) -> None:
        """Kill the workers at once and wait (bounded) until ``handles``, their calls, have
        ended: nothing of theirs writes after this returns."""
        self.session.shutdown()
        if handles:
            with contextlib.suppress(Exception):
                ray.wait(list(handles), num_returns=len(handles), timeout=timeout_s)

    def close(self, ok: bool) -> None:
        """Release the workers: stopped unless a session keeps them (and the call ended
        normally: after a failure they may still run its abandoned tasks)."""
        if self.owns_workers or not ok:
            self.session.shutdown()

    # -- shared storage ------------------------------------------------------------------------
    def check_shared(self, paths: Sequence[tuple[str, str, bool]]) -> None:
        """Refuse local paths the workers' nodes do not share with this one.

        Every node that hosts a worker must see the same directory at each local path: an
        output written on another node's own disk is lost to this one (and to any rerun), and
        an input only here is "not found" there. Inputs are compared by a fingerprint of their
        top-level entries; outputs by a marker this process writes and each node reads back.

        Args:
            paths: ``(flag, local path, is_output)``.

        Raises:
            ConfigError: naming the path, the flag and the node that does not share it.
        """
        here = ray.get_runtime_context().get_node_id()
        nodes = sorted({s.spec.node_id for s in self.slots if s.spec.node_id not in (None, here)
                        and s.state != "dropped"})
        local = [(f, p, out) for f, p, out in paths if "://" not in p or p.startswith("file://")]
        if not nodes or not local:
            return
        marker = f".safelora-shared-{uuid.uuid4().hex}"
        expected: dict[str, str] = {}
        written: list[str] = []
        try:
            for _, p, is_out in local:
                path = _local(p)
                if is_out:
                    os.makedirs(path, exist_ok=True)
                    with open(os.path.join(path, marker), "w") as f:
                        f.write(marker)
                    written.append(os.path.join(path, marker))
                expected[path] = _fingerprint(path, marker if is_out else None)
            probe = ray.remote(num_cpus=0)(_probe_paths)
            refs = {nid: probe.options(**_pinned(nid)).remote(
                sorted(expected), marker) for nid in nodes}
            names = {n.node_id: n.address for n in self.plan.nodes}
            for nid, ref in refs.items():
                try:
                    seen = ray.get(ref, timeout=START_TIMEOUT_S)
                except Exception as e:
                    raise ClusterError(f"could not check the local paths on node "
                                       f"{names.get(nid, nid)}: {e}") from e
                for flag, p, is_out in local:
                    path = _local(p)
                    if seen.get(path) != expected[path]:
                        what = "writes to" if is_out else "reads"
                        raise ConfigError(
                            f"{flag} {p} is a local path that node {names.get(nid, nid)} "
                            f"({nid[:12]}) does not share with this one: the run {what} it on "
                            "every node, so its files would scatter over the nodes' own "
                            "disks. Use s3:// (or a filesystem every node mounts at the same "
                            "path).")
        finally:
            for w in written:
                with contextlib.suppress(OSError):
                    os.unlink(w)


def wait_back(handle: Any, timeout_s: float) -> str | None:
    """Wait until a worker whose process died answers again (Ray restarts it on its node).

    Returns:
        None once it answers, else why it will not: gone for good (its node lost, or killed),
        or not back within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            ray.get(handle.ready.remote(), timeout=max(left, 0.5))
            return None
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnschedulableError) as e:
            return f"it is gone ({type(e).__name__}: its node was lost, or it was stopped)"
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.monotonic() >= deadline:
                return f"it did not come back within {timeout_s:.0f} s"
            time.sleep(0.5)  # restarting


def _has_role(spec: WorkerSpec, role: str) -> bool:
    if role == "io":
        return spec.does_io
    if role == "holder":
        return spec.holds_set
    return spec.role == role


def _local(uri: str) -> str:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _fingerprint(path: str, marker: str | None) -> str:
    """What a node sees at ``path``: the marker's content for an output, else the names and
    sizes of the top-level entries (a missing path reads as ``missing``)."""
    if marker is not None:
        try:
            with open(os.path.join(path, marker)) as f:
                return "marker:" + f.read()
        except OSError:
            return "missing"
    if not os.path.exists(path):
        return "missing"
    if os.path.isfile(path):
        st = os.stat(path)
        return f"file:{st.st_size}"
    h = hashlib.sha256()
    try:
        for name in sorted(os.listdir(path))[:1000]:
            if name.startswith(".safelora-shared-"):
                continue
            full = os.path.join(path, name)
            size = os.path.getsize(full) if os.path.isfile(full) else -1
            h.update(f"{name}\0{size}\n".encode())
    except OSError:
        return "missing"
    return "dir:" + h.hexdigest()


def _probe_paths(paths: Sequence[str], marker: str) -> dict[str, str]:
    """Run on a node: its view of each path (see :func:`_fingerprint`); an output directory
    without the driver's marker is another directory than the driver's."""
    return {p: _fingerprint(p, marker if os.path.exists(os.path.join(p, marker)) else None)
            for p in paths}


class InlineExecutor:
    """Runs task functions in this process: one :class:`WorkerCore`, build calls one at a
    time, up to two sanitize batches at a time (threads, as in a worker actor).

    Like a worker process, it sets this process's float32 matmul precision to ``highest``
    (no TF32), which SPEC equality needs.
    """

    in_process = True
    owns_workers = True
    size = 1
    kind = "in-process"

    def __init__(self, use_gpu: bool | None) -> None:
        cuda = torch.cuda.is_available()
        if use_gpu and not cuda:
            raise ConfigError("GPU workers were required (--gpu) but this process sees no "
                              "CUDA device")
        device = "cuda" if (use_gpu or use_gpu is None) and cuda else "cpu"
        full_precision_matmul()  # no TF32: SPEC equality needs full float32 products
        self.core = WorkerCore(device)
        self.slots = [WorkerSlot(WorkerSpec(None, 0.0, 0.0, "holder+io"), None, "ready",
                                 device)]
        self._pools = {g: cf.ThreadPoolExecutor(n, thread_name_prefix=f"safelora-{g}")
                       for g, n in GROUPS.items() if g != "serve"}
        self._calls: dict[cf.Future[Any], int] = {}

    def usable(self, role: str | None = None) -> list[int]:
        return [0]

    def alive(self, role: str | None = None) -> list[int]:
        return [0]

    def holder_of(self, i: int) -> None:
        return None

    def holder_index(self, i: int) -> None:
        return None

    def lost(self, i: int, gone: str | None = None) -> bool:  # pragma: no cover
        # a thread cannot die alone
        raise AssertionError("in-process workers are never lost")

    def put(self, value: Any) -> Any:
        return value

    def submit(self, i: int, fn: Callable[..., Any], *args: Any,
               group: str = "batch") -> cf.Future[Any]:
        fut = self._pools[group].submit(self.core.call, fn, *args)
        self._calls[fut] = i
        return fut

    def worker_of(self, handle: cf.Future[Any]) -> int:
        return self._calls[handle]

    def wait(self, handles: Sequence[cf.Future[Any]], timeout_s: float, what: str) -> Any:
        done, _ = cf.wait(handles, timeout=timeout_s, return_when=cf.FIRST_COMPLETED)
        if not done:
            raise TimeoutError(f"no {what} finished within {timeout_s:.0f} s")
        return next(h for h in handles if h in done)  # the oldest finished: deterministic

    def result(self, handle: cf.Future[Any], timeout_s: float) -> Any:
        self._calls.pop(handle, None)
        return handle.result(timeout=timeout_s)

    def notify(self, fn: Callable[..., Any], *args: Any, group: str = "stream",
               role: str | None = None) -> None:
        self.core.call(fn, *args)

    def cancel(self, token: str, timeout_s: float = 10.0) -> None:
        self.core.context.cancel(token)

    def drain(self, handles: Sequence[cf.Future[Any]], timeout_s: float) -> list[Any]:
        for h in handles:
            h.cancel()  # not started yet: never will
        _, left = cf.wait(handles, timeout=timeout_s)
        return list(left)

    def stop(self, handles: Sequence[cf.Future[Any]], timeout_s: float = 30.0) -> None:
        # Threads cannot be killed; cancelled calls stop after the unit in progress.
        cf.wait(handles, timeout=timeout_s)

    def check_shared(self, paths: Sequence[tuple[str, str, bool]]) -> None:
        """Nothing to check: this process is the only one."""

    def close(self, ok: bool) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=ok, cancel_futures=True)
        self.core.context.close()


Executor = RayExecutor | InlineExecutor

#: Seconds an interrupted run waits for the calls in flight to reach a safe point.
INTERRUPT_GRACE_S = env_number("SAFELORA_INTERRUPT_GRACE_S", 30)


def wind_down(ex: Executor, token: str, handles: Sequence[Any],
              grace_s: float = INTERRUPT_GRACE_S) -> None:
    """After Ctrl-C: ask run ``token``'s tasks to stop at their next safe point, wait for the
    calls in flight (``handles``, at most ``grace_s``; a second Ctrl-C cuts it short), then
    stop the workers and wait until none of them can write any more. Afterwards nothing of
    the run is half-written, and no worker writes behind the driver's back."""
    grace_s = grace_left(grace_s)  # after SIGTERM: within the stopper's grace period
    logger.warning("interrupted: letting the work in progress reach a safe point (at most "
                   "%.0f s; Ctrl-C again to stop at once)", grace_s)
    left = list(handles)
    try:
        ex.cancel(token)
        left = ex.drain(left, grace_s)
    except KeyboardInterrupt:
        pass
    try:
        ex.stop(left)
    except KeyboardInterrupt:
        ex.stop(left, timeout_s=5.0)


# ---------------------------------------------------------------------------------------------
# Where a call runs
# ---------------------------------------------------------------------------------------------


def cluster_configured(ray_address: str | None) -> bool:
    """Whether work should go to a Ray cluster: connected already, or an address is given."""
    return ray.is_initialized() or bool(ray_address or os.environ.get("RAY_ADDRESS"))


def in_process(requested: int | None, use_gpu: bool | None, ray_address: str | None,
               small: bool) -> bool:
    """Whether a call runs in this process (see the module docstring)."""
    if requested == 0:
        return True
    if requested is not None or use_gpu or not small or cluster_configured(ray_address):
        return False
    # A local GPU that use_gpu=None would use: Ray's GPU workers pipeline better.
    return use_gpu is False or not torch.cuda.is_available()


def resolve_workers(requested: int | None, use_gpu: bool | None, ray_address: str | None,
                    small: bool, shape: str = "device", workers_per_gpu: int = 1) -> WorkerPlan:
    """Where a call runs: this process (see ``in_process``), or worker actors on Ray
    (connected to, or started, here), planned per live node.

    Args:
        requested: ``workers`` of the config: 0 = this process, None = decide.
        use_gpu: ``use_gpu`` of the config.
        ray_address: Cluster address of the config.
        small: Whether the job is small enough for this process.
        shape: ``device`` (a build: one worker per GPU or CPU) or ``pipeline`` (a
            sanitize: holders of the set and I/O workers, ``requested`` counting the latter).
        workers_per_gpu: Holders per GPU (pipeline).
    """
    if in_process(requested, use_gpu, ray_address, small):
        if requested is None:
            logger.info("a small job and no Ray cluster configured: running in this process "
                        "(--workers N runs it on N Ray workers)")
        return WorkerPlan(())
    ensure_ray(ray_address)
    nodes = live_nodes()
    if shape == "pipeline":
        specs = plan_pipeline(nodes, requested, use_gpu, workers_per_gpu)
    else:
        specs = plan_device_workers(nodes, requested, use_gpu)
    capacity = sum(n.cpus for n in nodes)
    need = sum(s.num_cpus for s in specs)
    if need > capacity + 1e-9:
        logger.warning("%d worker(s) ask for %.2f CPUs, the cluster has %.0f: those that find "
                       "no room within %.0f s are dropped", len(specs), need, capacity,
                       START_TIMEOUT_S)
    return WorkerPlan(tuple(specs), tuple(nodes))


def open_executor(plan: WorkerPlan, use_gpu: bool | None) -> Executor:
    """The executor for :func:`resolve_workers`' answer."""
    if plan.in_process:
        return InlineExecutor(use_gpu)
    return RayExecutor(plan)


__all__ = ["GROUPS", "INLINE_MAX_ADAPTERS", "INLINE_MAX_BUILD_BYTES", "REJOIN_TIMEOUT_S",
           "START_TIMEOUT_S", "WORKER_LOST", "InlineExecutor", "RayExecutor", "SafeLoraWorker",
           "WorkerContext", "WorkerCore", "WorkerPlan", "WorkerSession", "WorkerSlot",
           "in_process", "live_nodes", "open_executor", "resolve_workers", "wait_back",
           "wind_down", "worker_session"]
