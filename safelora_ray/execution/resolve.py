"""Where a call runs: in this process, or on worker actors planned per live node.

A small job runs in this process when no Ray cluster is configured: starting a private local
Ray (4-7 s) and worker processes that import torch (~2 s) would cost more than the job. A
build on such a machine runs here whatever its size (:func:`local_build`).
"""

from __future__ import annotations

import logging
import os

import ray
import torch

from safelora_ray.execution.actor import START_TIMEOUT_S, live_nodes
from safelora_ray.execution.executor import Executor
from safelora_ray.execution.inline import InlineExecutor
from safelora_ray.execution.placement import plan_device_workers, plan_pipeline
from safelora_ray.execution.ray_executor import RayExecutor, WorkerPlan
from safelora_ray.execution.ray_utils import ensure_ray
from safelora_ray.execution.session import active_session

logger = logging.getLogger(__name__)

#: The sanitize bar of :func:`inline_max_adapters`: this many adapters per CPU, and never
#: below :data:`INLINE_MIN_ADAPTERS`.
INLINE_ADAPTER_CPUS = 1536
INLINE_MIN_ADAPTERS = 256
#: The same for a build: target bytes of the pair (a ~1B-parameter pair's q/v).
INLINE_MAX_BUILD_BYTES = 2 * 1024**3


def inline_max_adapters(cpus: int | None = None) -> int:
    """The most adapters a sanitize job runs in this process when no cluster is configured
    (``workers=None``): :data:`INLINE_ADAPTER_CPUS` / this machine's CPUs, at least
    :data:`INLINE_MIN_ADAPTERS` (768 on 2 CPUs, 384 on 4, 256 from 6 on).

    Why: a private local Ray costs a fixed start (Ray 2.5-4 s, its workers' imports), and
    what its processes add grows with the cores beyond the ~1.5 the in-process run keeps busy.
    On 2 CPUs (docs/benchmarks.md §15.5) the in-process run was as fast as a private Ray
    started for the job up to ~600 7B-shaped adapters on local disk (Ray ahead by 6-15 % at
    1,024), faster at 600 on S3, and up to ~1,000-2,000 small adapters; above 2 CPUs the bar
    is interpolated down to the 256 kept for larger machines.
    """
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            cpus = os.cpu_count() or 1
    return max(INLINE_MIN_ADAPTERS, INLINE_ADAPTER_CPUS // max(cpus, 1))


def cluster_configured(ray_address: str | None) -> bool:
    """Whether work should go to a Ray cluster: connected already, or an address is given."""
    return ray.is_initialized() or bool(ray_address or os.environ.get("RAY_ADDRESS"))


def local_build() -> bool:
    """The ``shape == "build"`` rule: on one machine with no Ray cluster configured and no
    :func:`~safelora_ray.execution.session.worker_session` open, a build runs in this process
    whatever its size — on the local GPU (``use_gpu`` True or None and torch sees CUDA), else
    on the CPU with torch's intra-op threads.

    Why: a build is one stream (read → ``V Vᵀ`` → write) that the in-process executor runs
    with the same reader, compute and writer threads as a worker actor, so the actor adds
    nothing but its start: on an H100 5.1 s of a 9.1 s 7B build (docs/benchmarks.md §6), plus
    4-7 s for the private local Ray. On the CPU, in-process measured faster than one Ray
    worker per CPU too (§14). Inside a session the other jobs' rule applies: its workers,
    warm from the build, serve the sanitize that follows. ``use_gpu=True`` where torch sees
    no CUDA device is refused by the in-process executor (a ConfigError)."""
    return active_session() is None


def in_process(requested: int | None, use_gpu: bool | None, ray_address: str | None,
               small: bool, shape: str = "device") -> bool:
    """Whether a call runs in this process (see the module docstring).

    Args:
        shape: ``build`` applies :func:`local_build` on a machine with no cluster.
    """
    if requested == 0:
        return True
    if requested is not None or cluster_configured(ray_address):
        return False
    if shape == "build" and local_build():
        return True
    if use_gpu or not small:
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
        shape: ``device`` (one worker per GPU or CPU), ``build`` (the same, and in this
            process on a machine with no cluster: :func:`local_build`) or ``pipeline`` (a
            sanitize: holders of the set and I/O workers, ``requested`` counting the latter).
        workers_per_gpu: Holders per GPU (pipeline).
    """
    if in_process(requested, use_gpu, ray_address, small, shape):
        if requested is None:
            logger.info("%s and no Ray cluster configured: running in this process "
                        "(--workers N runs it on N Ray workers)",
                        "a build" if shape == "build" else "a small job")
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


__all__ = ["INLINE_ADAPTER_CPUS", "INLINE_MAX_BUILD_BYTES", "INLINE_MIN_ADAPTERS",
           "cluster_configured", "in_process", "inline_max_adapters",
           "local_build", "open_executor", "resolve_workers"]
