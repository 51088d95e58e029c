"""Where a call runs: in this process, or on worker actors planned per live node.

A small job runs in this process when no Ray cluster is configured: starting a private local
Ray (4-7 s) and worker processes that import torch (~2 s) would cost more than the job.
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

logger = logging.getLogger(__name__)

#: A sanitize job of at most this many adapters runs in this process when no cluster is
#: configured (``workers=None``). On 2 cores the break-even against a private local Ray is
#: ~700 adapters; bigger machines gain more from Ray's processes, so the bar is lower.
INLINE_MAX_ADAPTERS = 256
#: The same for a build: target bytes of the pair (a ~1B-parameter pair's q/v).
INLINE_MAX_BUILD_BYTES = 2 * 1024**3


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


__all__ = ["INLINE_MAX_ADAPTERS", "INLINE_MAX_BUILD_BYTES", "cluster_configured", "in_process",
           "open_executor", "resolve_workers"]
