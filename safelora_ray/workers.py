"""The execution layer: where pipeline work runs, on long-lived worker actors or in this
process. It sits below the pipelines (build, sanitize, ...) and knows none of them.

A pipeline's work is a *task function* ``fn(context, *args)``, a module-level function of the
pipeline's module (shipped to workers by reference). It runs on a worker against a
:class:`WorkerContext`: the device the worker computes on and *slots* of state kept between
calls (a shard builder's reader threads, an alignment set resident on the GPU).
:class:`WorkerCore` holds that context; :class:`SafeLoraWorker` is the core as a Ray actor.
The pipelines' driver loops talk to an *executor*:

- :class:`RayExecutor` runs on worker actors. Inside :func:`worker_session` the actors are
  started once and shared by every call (a nightly run builds and then sanitizes several
  catalogs on the same warm workers, with the alignment set already resident); outside one,
  each call starts its own and stops them when it returns, so no cluster resource stays held.
- :class:`InlineExecutor` runs in the driver process (``workers=0``, like PyTorch's
  ``DataLoader(num_workers=0)``), and is what ``workers=None`` picks for a small job when no
  Ray cluster is configured: starting a private local Ray (4-7 s) and worker processes that
  import torch (~2 s) would cost more than the job.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
import torch

from safelora_ray.errors import ConfigError
from safelora_ray.math_core import full_precision_matmul
from safelora_ray.ray_utils import (
    WorkerResources,
    ensure_ray,
    get_unwrapped,
    pick_device,
    plan_workers,
    worker_runtime_env,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Exceptions that mean a worker process died (its task may have been lost with it).
WORKER_LOST: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)

#: A sanitize job of at most this many adapters runs in this process when no cluster is
#: configured (``workers=None``). On 2 cores the break-even against a private local Ray is
#: ~700 adapters; bigger machines gain more from Ray's processes, so the bar is lower.
INLINE_MAX_ADAPTERS = 256
#: The same for a build: target bytes of the pair (a ~1B-parameter pair's q/v).
INLINE_MAX_BUILD_BYTES = 2 * 1024**3


class WorkerContext:
    """What a task function sees of the worker it runs on: the device it computes on, and
    state kept between calls (a shard builder's reader threads, a resident alignment set).

    State lives in named *slots*, one object per slot: asking a slot for another key drops the
    object it held (calling its ``close()`` if it has one) before the factory makes the new
    one, so a 70B alignment set is never resident twice. Thread-safe; each slot has its own
    lock, so a slow factory (loading a set) does not hold up the other slots.

    Args:
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, device: str) -> None:
        self.device = device
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
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.context = WorkerContext(device)

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
#: batch reads and writes, I/O releasing the GIL, while the other computes).
GROUPS = {"stream": 1, "batch": 2}
#: Cancellation reaches a worker through its own group, never queued behind the work.
CONTROL_GROUP = "control"
#: Log records relayed per call at most (a task that logs in a loop must not flood the driver).
MAX_RELAYED = 200


class _Relay(logging.Handler):
    """Collects the ``safelora_ray`` log records a call emits in its own thread, to send them
    back with its result: the driver prints them in order, once, and never after its final
    summary (Ray's own log forwarding is asynchronous and prints every line with a prefix)."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        buf = getattr(self._local, "records", None)
        if buf is not None and len(buf) < MAX_RELAYED:
            buf.append((record.name, record.levelno, record.getMessage()))

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[str, int, str]]]:
        self._local.records = records = []
        try:
            yield records
        finally:
            self._local.records = None


@dataclass(frozen=True)
class Relayed:
    """A worker call's result and the log records it emitted."""

    result: Any
    records: list[tuple[str, int, str]]


def relay(records: Sequence[tuple[str, int, str]]) -> None:
    """Emit a worker's log records here, under their own logger names."""
    for name, level, message in records:
        logging.getLogger(name).log(level, "%s", message)


@ray.remote(max_restarts=2, max_task_retries=2,
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
        self.core = WorkerCore(_configure_process(num_gpus))

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
# Worker sessions: actors shared by the calls made inside one
# ---------------------------------------------------------------------------------------------


class WorkerSession:
    """Worker actors kept between calls. One set of actors at a time: a call asking for other
    resources (GPU after CPU) stops the current ones first, so they never hold what the new
    ones need."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._actors: list[Any] = []
        self._start: Callable[[], Any] | None = None  # starts one worker like the others
        self._lock = threading.Lock()

    def acquire(self, res: WorkerResources, n: int, runtime_env: dict[str, Any]) -> list[Any]:
        """``n`` workers with resources ``res``: the running ones, plus new ones if needed."""
        cls = SafeLoraWorker  # looked up at call time (tests substitute a crashing class)
        level = logging.getLogger("safelora_ray").getEffectiveLevel()
        key = (id(cls), res.num_cpus, res.num_gpus, json.dumps(runtime_env, sort_keys=True),
               ray.get_runtime_context().get_job_id(), level)
        with self._lock:
            if key != self._key:
                self._stop_locked()
                self._key = key
                self._start = lambda: cls.options(
                    num_cpus=res.num_cpus, num_gpus=res.num_gpus, runtime_env=runtime_env
                ).remote(res.num_gpus, level)
            assert self._start is not None
            while len(self._actors) < n:
                self._actors.append(self._start())
            return list(self._actors[:n])

    def replace(self, i: int, dead: Any) -> Any:
        """A fresh worker ``i`` in place of ``dead``, which is killed (if another call replaced
        it already: that replacement)."""
        with self._lock:
            if i < len(self._actors) and self._actors[i] != dead:
                return self._actors[i]
            with contextlib.suppress(Exception):
                ray.kill(dead)
            assert self._start is not None
            while len(self._actors) <= i:  # the session was stopped meanwhile
                self._actors.append(self._start())
            if self._actors[i] == dead:
                self._actors[i] = self._start()
            return self._actors[i]

    def shutdown(self) -> None:
        """Stop every worker of the session."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._actors and ray.is_initialized():
            for a in self._actors:
                with contextlib.suppress(Exception):
                    ray.kill(a)
        self._actors = []
        self._key = None


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
# Executors: what the driver loops of build and sanitize talk to
# ---------------------------------------------------------------------------------------------


class RayExecutor:
    """Runs worker methods on ``n`` worker actors (those of the active :func:`worker_session`,
    else actors of its own, stopped by :meth:`close`)."""

    in_process = False

    def __init__(self, res: WorkerResources, n: int) -> None:
        self.res = res
        self.owns_workers = _session is None
        self.session = _session if _session is not None else WorkerSession()
        self.actors = self.session.acquire(res, n, worker_runtime_env())

    @property
    def size(self) -> int:
        return len(self.actors)

    @property
    def kind(self) -> str:
        return "GPU" if self.res.uses_gpu else "CPU"

    def put(self, value: Any) -> Any:
        """Ship ``value`` to the object store once (passed to many calls)."""
        return ray.put(value)

    def submit(self, i: int, fn: Callable[..., Any], *args: Any, group: str = "batch") -> Any:
        """Run ``fn(context, *args)`` on worker ``i`` in concurrency group ``group``."""
        return self.actors[i].call.options(concurrency_group=group).remote(fn, *args)

    def wait(self, handles: Sequence[Any], timeout_s: float, what: str) -> Any:
        ready, _ = ray.wait(list(handles), num_returns=1, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"no {what} finished within {timeout_s:.0f} s")
        return ready[0]

    def result(self, handle: Any, timeout_s: float) -> Any:
        """The call's return value; raises one of :data:`WORKER_LOST` if its worker died.
        The log records the call emitted on its worker are emitted here first."""
        out = get_unwrapped(handle, timeout_s)
        if isinstance(out, Relayed):
            relay(out.records)
            return out.result
        return out

    def cancel(self, token: str, timeout_s: float = 10.0) -> None:
        """Ask every worker to stop the tasks of run ``token`` at their next safe point."""
        refs = []
        for a in self.actors:
            with contextlib.suppress(Exception):
                refs.append(a.cancel.remote(token))
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

    def replace(self, i: int) -> None:
        """Put a fresh worker in place of worker ``i`` (after it died)."""
        self.actors[i] = self.session.replace(i, self.actors[i])

    def notify(self, fn: Callable[..., Any], *args: Any, group: str = "stream") -> None:
        """Run ``fn(context, *args)`` on every worker without waiting (housekeeping)."""
        for a in self.actors:
            with contextlib.suppress(Exception):
                a.call.options(concurrency_group=group).remote(fn, *args)

    def close(self, ok: bool) -> None:
        """Release the workers: stopped unless a session keeps them (and the call ended
        normally: after a failure they may still run its abandoned tasks)."""
        if self.owns_workers or not ok:
            self.session.shutdown()


class InlineExecutor:
    """Runs worker methods in this process: one :class:`WorkerCore`, build calls one at a
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
        self._pools = {g: cf.ThreadPoolExecutor(n, thread_name_prefix=f"safelora-{g}")
                       for g, n in GROUPS.items()}

    def put(self, value: Any) -> Any:
        return value

    def submit(self, i: int, fn: Callable[..., Any], *args: Any,
               group: str = "batch") -> cf.Future[Any]:
        return self._pools[group].submit(self.core.call, fn, *args)

    def wait(self, handles: Sequence[cf.Future[Any]], timeout_s: float, what: str) -> Any:
        done, _ = cf.wait(handles, timeout=timeout_s, return_when=cf.FIRST_COMPLETED)
        if not done:
            raise TimeoutError(f"no {what} finished within {timeout_s:.0f} s")
        return next(h for h in handles if h in done)  # the oldest finished: deterministic

    def result(self, handle: cf.Future[Any], timeout_s: float) -> Any:
        return handle.result(timeout=timeout_s)

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

    def replace(self, i: int) -> None:  # pragma: no cover - a thread cannot die alone
        raise AssertionError("in-process workers are never replaced")

    def notify(self, fn: Callable[..., Any], *args: Any, group: str = "stream") -> None:
        self.core.call(fn, *args)

    def close(self, ok: bool) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=ok, cancel_futures=True)
        self.core.context.close()


Executor = RayExecutor | InlineExecutor

#: Seconds an interrupted run waits for the calls in flight to reach a safe point.
INTERRUPT_GRACE_S = float(os.environ.get("SAFELORA_INTERRUPT_GRACE_S", "30"))


def wind_down(ex: Executor, token: str, handles: Sequence[Any],
              grace_s: float = INTERRUPT_GRACE_S) -> None:
    """After Ctrl-C: ask run ``token``'s tasks to stop at their next safe point, wait for the
    calls in flight (``handles``, at most ``grace_s``; a second Ctrl-C cuts it short), then
    stop the workers and wait until none of them can write any more. Afterwards nothing of
    the run is half-written, and no worker writes behind the driver's back."""
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
                    small: bool, workers_per_gpu: int = 1) -> WorkerResources:
    """Where a call runs: ``num_workers == 0`` is this process (see ``in_process``), else
    worker actors on Ray (connected to, or started, here).

    Args:
        requested: ``workers`` of the config: 0 = this process, None = decide.
        use_gpu: ``use_gpu`` of the config.
        ray_address: Cluster address of the config.
        small: Whether the job is small enough for this process.
        workers_per_gpu: GPU workers sharing one GPU.
    """
    if in_process(requested, use_gpu, ray_address, small):
        if requested is None:
            logger.info("a small job and no Ray cluster configured: running in this process "
                        "(--workers N runs it on N Ray workers)")
        return WorkerResources(0, 0.0, 0.0)
    ensure_ray(ray_address)
    return plan_workers(requested, use_gpu, workers_per_gpu=workers_per_gpu)


def open_executor(res: WorkerResources, use_gpu: bool | None,
                  n: int | None = None) -> Executor:
    """The executor for :func:`resolve_workers`' answer ``res``; ``n`` workers (default all)."""
    if res.num_workers == 0:
        return InlineExecutor(use_gpu)
    return RayExecutor(res, n if n is not None else res.num_workers)


__all__ = ["GROUPS", "INLINE_MAX_ADAPTERS", "INLINE_MAX_BUILD_BYTES", "WORKER_LOST",
           "InlineExecutor", "RayExecutor", "SafeLoraWorker", "WorkerContext", "WorkerCore",
           "WorkerSession",
           "in_process", "open_executor", "resolve_workers", "wind_down", "worker_session"]
