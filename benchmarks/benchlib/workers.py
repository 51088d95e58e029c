"""What each worker actor of a session holds (asked of the actors themselves), and waiting for
a job's workers to be gone before the next is measured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import psutil
import torch

from benchlib.monitor import process_role
from benchlib.runtime import holder_design

logger = logging.getLogger(__name__)


def _worker_state(ctx: Any) -> dict[str, Any]:
    """Runs on a worker (a task function): its pid, device, slots, and the bytes of the
    alignment set it keeps resident: ``set_bytes`` its own copy (a GPU holder's, or the set a
    CPU node's first I/O worker shared: put in the node's object store, or its files mapped),
    ``mapped_bytes`` the shared pages it computes with (no copy of its own); an I/O worker of
    a GPU node holds the set's metadata only."""
    from safelora_ray.pipelines.sanitize.shared_set import SharedSet

    set_bytes = mapped = 0
    for slot in ctx.slots():
        held = ctx.peek(slot)
        obj = held[1] if held else None
        if isinstance(obj, SharedSet):  # a CPU node's (or a fake GPU's) shared set
            set_bytes += int(obj.nbytes)
        engine = getattr(obj, "engine", obj)  # a holder's service, or an engine
        matrices = getattr(engine, "matrices", None)
        if matrices is not None and hasattr(matrices, "nbytes"):
            if getattr(matrices, "mapped", False):
                mapped += int(matrices.nbytes)
            else:
                set_bytes += int(matrices.nbytes)
        own = getattr(obj, "_own_engine", None)  # a sanitizer computing its own products
        if own is not None:
            set_bytes += int(own.matrices.nbytes)
    cuda = None
    if str(ctx.device).startswith("cuda"):
        cuda = {"allocated": int(torch.cuda.memory_allocated()),
                "reserved": int(torch.cuda.memory_reserved())}
    return {"pid": os.getpid(), "device": ctx.device, "node_id": ctx.node_id,
            "slots": sorted(ctx.slots()), "set_bytes": set_bytes, "mapped_bytes": mapped,
            "cuda": cuda}


def worker_states(session: Any, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Ask every worker actor of a ``worker_session`` what it holds (see
    :func:`_worker_state`). Empty when the session's actors cannot be listed."""
    import ray

    actors = session_actors(session)
    if not actors or not ray.is_initialized() or not holder_design():
        return []  # the code before 36cc1b4: every worker holds the set
    # Shipped by reference: Ray puts the driver's script folder (benchmarks/) on the
    # workers' sys.path, so they import `benchlib` too.
    refs = [a.call.options(concurrency_group="control").remote(_worker_state)
            for a in actors]
    out = []
    for ref in refs:
        try:
            got = ray.get(ref, timeout=timeout_s)
        except Exception as e:  # a worker that died: nothing to label
            logger.warning("could not ask a worker what it holds: %s", e)
            continue
        out.append(getattr(got, "result", got))
    return out


def session_actors(session: Any) -> list[Any]:
    """The worker actors of a ``worker_session`` (its own list: ``(key, handle)`` pairs, or
    handles in the code before 36cc1b4)."""
    items = list(getattr(session, "_actors", []))
    return [x[1] if isinstance(x, tuple) else x for x in items]


#: Process roles of a job's workers: a job is over once none of them is left.
JOB_WORKER_ROLES = ("SafeLoraWorker", "MapWorker")


def release_freed_memory() -> None:
    """Give the heap memory this process freed back to the OS (glibc ``malloc_trim``), so
    that what the baseline or the input writers allocated and freed in the driver does not
    count in the next measured run's RSS (~0.5 GB after the 134M baseline). No-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name or "libc.so.6").malloc_trim(0)


def wait_workers_gone(timeout_s: float = 30.0) -> float:
    """Wait until the worker actors this process's jobs started (``SafeLoraWorker``, Ray
    Data's ``MapWorker``) have exited: ``ray.kill`` returns at once, and a dying worker of
    one job must not count in the next job's memory. Returns the seconds waited."""
    t0 = time.perf_counter()
    me = psutil.Process(os.getpid())
    while time.perf_counter() - t0 < timeout_s:
        try:
            procs = me.children(recursive=True)
        except psutil.Error:
            break
        if not any(process_role(p, me.pid).startswith(JOB_WORKER_ROLES) for p in procs):
            break
        time.sleep(0.1)
    return round(time.perf_counter() - t0, 3)


def worker_roles(states: Sequence[dict[str, Any]]) -> dict[int, str]:
    """``{pid: "SafeLoraWorker (holder)"}`` and the like, from :func:`worker_states`: a
    holder keeps alignment matrices resident; an I/O worker has sanitized batches (its
    ``sanitizer`` slot); a CPU node's first worker is both (``holder+io``)."""
    roles = {}
    for s in states:
        io = "sanitizer" in s["slots"]
        role = ("holder+io" if io else "holder") if s["set_bytes"] else ("io" if io else "idle")
        roles[s["pid"]] = f"SafeLoraWorker ({role})"
    return roles
