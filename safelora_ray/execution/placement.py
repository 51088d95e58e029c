"""Where worker actors go: a plan per node from the cluster's live nodes.

Pure planning (no Ray calls here, so it is tested on made-up clusters). The execution layer
(:mod:`safelora_ray.execution.resolve`) reads the live nodes, asks for a plan and pins each
actor to its node (hard node affinity: an actor whose node is lost dies with it, and the run
goes on with the others instead of waiting for a replacement that may never be placed).

Two shapes of work:

- **device workers** (a build): one per GPU (every GPU of every node), or, without GPUs, one
  per CPU; each takes a contiguous run of layers;
- **a pipeline** (a sanitize): per node, *holders* keep the alignment set resident (one per
  GPU — ``workers_per_gpu`` per GPU if asked — or one per CPU-only node) and *I/O workers*
  (one per remaining CPU) read, check and write adapters, sending each batch's B matrices to
  a holder of their own node for the products. The set is held once per GPU (or per node),
  however many I/O workers there are. On a CPU-only node the first I/O worker is the holder:
  it shares the set on the node (its files mapped, or in the node's object store), and every
  I/O worker computes its own products with those pages (see
  :mod:`safelora_ray.pipelines.sanitize.shared_set`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from safelora_ray.core.errors import ConfigError

logger = logging.getLogger(__name__)

#: CPU share of a GPU worker: it mostly waits on its GPU; a whole CPU each would starve the
#: I/O workers (and deadlock a 2-CPU node's pipeline).
GPU_WORKER_CPUS = 0.25


@dataclass(frozen=True)
class NodeInfo:
    """A live node and what it offers."""

    node_id: str
    address: str
    cpus: float
    gpus: float
    store_bytes: float = 0.0  # its Ray object store's capacity (0: unknown)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker actor: the node it is pinned to and what it asks of the scheduler.

    Attributes:
        node_id: The node (None: anywhere, in-process plans only).
        num_cpus: CPUs reserved.
        num_gpus: GPU share (0: a CPU worker).
        role: ``device`` (build), ``holder`` (keeps the set, serves products), ``io`` (reads
            and writes adapters), or ``holder+io`` (a CPU node's first I/O worker).
        holder: For an I/O worker, the index (in the plan) of the holder it sends products
            to; None when it is the holder itself.
    """

    node_id: str | None
    num_cpus: float
    num_gpus: float
    role: str
    holder: int | None = None

    @property
    def resources(self) -> tuple[str | None, float, float]:
        """What makes two specs interchangeable (a session reuses a matching actor)."""
        return (self.node_id, self.num_cpus, self.num_gpus)

    @property
    def holds_set(self) -> bool:
        return self.role in ("holder", "holder+io")

    @property
    def does_io(self) -> bool:
        return self.role in ("io", "holder+io")


def _gpu_nodes(nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
    return [n for n in nodes if int(n.gpus) > 0]


def _spread(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split over nodes in proportion to ``weights`` (largest remainders), each
    node at most its weight rounded down when the total fits."""
    cap = [max(0, math.floor(w)) for w in weights]
    if total >= sum(cap):
        base = list(cap)
        extra = total - sum(cap)
        i = 0
        while extra > 0 and base:  # more than the cluster holds: round-robin the rest
            base[i % len(base)] += 1
            extra -= 1
            i += 1
        return base
    w = sum(weights) or 1.0
    raw = [total * x / w for x in weights]
    out = [min(c, math.floor(r)) for c, r in zip(cap, raw, strict=True)]
    order = sorted(range(len(weights)), key=lambda k: raw[k] - out[k], reverse=True)
    k = 0
    while sum(out) < total:
        j = order[k % len(order)]
        if out[j] < cap[j]:
            out[j] += 1
        k += 1
    return out


def use_gpus(nodes: Sequence[NodeInfo], use_gpu: bool | None) -> bool:
    """Whether to use GPU workers (``use_gpu`` None: when the cluster has GPUs).

    Raises:
        ConfigError: GPUs required (``--gpu``) on a cluster without one.
    """
    has = bool(_gpu_nodes(nodes))
    if use_gpu and not has:
        raise ConfigError("GPU workers were required (--gpu) but the Ray cluster has no GPU")
    return has if use_gpu is None else bool(use_gpu)


def plan_device_workers(nodes: Sequence[NodeInfo], requested: int | None,
                        use_gpu: bool | None) -> list[WorkerSpec]:
    """Workers for a build: ``requested`` of them (default: one per GPU, or one per CPU),
    spread over the nodes in proportion to what each offers."""
    if not nodes:
        raise ConfigError("the Ray cluster has no live node")
    if use_gpus(nodes, use_gpu):
        gnodes = _gpu_nodes(nodes)
        counts = _spread(requested or sum(int(n.gpus) for n in gnodes),
                         [int(n.gpus) for n in gnodes])
        return [WorkerSpec(n.node_id, GPU_WORKER_CPUS, 1.0, "device")
                for n, k in zip(gnodes, counts, strict=True) for _ in range(k)]
    counts = _spread(requested or max(1, sum(int(n.cpus) for n in nodes)),
                     [n.cpus for n in nodes])
    return [WorkerSpec(n.node_id, 1.0, 0.0, "device")
            for n, k in zip(nodes, counts, strict=True) for _ in range(k)]


def plan_pipeline(nodes: Sequence[NodeInfo], requested_io: int | None, use_gpu: bool | None,
                  workers_per_gpu: int = 1) -> list[WorkerSpec]:
    """Holders and I/O workers for a sanitize (see the module docstring).

    Args:
        nodes: The live nodes.
        requested_io: I/O workers in all (``--workers``); default one per CPU left over.
        use_gpu: GPU holders (None: when the cluster has GPUs).
        workers_per_gpu: Holders per GPU (each keeps its own copy of the set).

    Returns:
        The specs: on every node used, its holders first, then its I/O workers (each naming
        its holder, round-robin over the node's holders).
    """
    if not nodes:
        raise ConfigError("the Ray cluster has no live node")
    if workers_per_gpu < 1:
        raise ConfigError(f"--workers-per-gpu must be ≥ 1, got {workers_per_gpu}")
    specs: list[WorkerSpec] = []
    if use_gpus(nodes, use_gpu):
        gnodes = _gpu_nodes(nodes)
        holders = [int(n.gpus) * workers_per_gpu for n in gnodes]
        free = [max(1.0, n.cpus - h * GPU_WORKER_CPUS) for n, h in zip(gnodes, holders,
                                                                         strict=True)]
        io = _spread(requested_io or sum(math.floor(f) for f in free), free)
        for n, h, k in zip(gnodes, holders, io, strict=True):
            if k == 0:  # --workers fewer than the GPU nodes: holders there would serve nobody
                continue
            first = len(specs)
            specs += [WorkerSpec(n.node_id, GPU_WORKER_CPUS, 1.0 / workers_per_gpu, "holder")
                      for _ in range(h)]
            specs += [WorkerSpec(n.node_id, 1.0, 0.0, "io", holder=first + j % h)
                      for j in range(k)]
        return specs
    io = _spread(requested_io or max(1, sum(int(n.cpus) for n in nodes)),
                 [n.cpus for n in nodes])
    for n, k in zip(nodes, io, strict=True):
        if k == 0:
            continue
        first = len(specs)
        specs.append(WorkerSpec(n.node_id, 1.0, 0.0, "holder+io"))
        specs += [WorkerSpec(n.node_id, 1.0, 0.0, "io", holder=first) for _ in range(k - 1)]
    return specs


def describe_plan(specs: Sequence[WorkerSpec], nodes: Sequence[NodeInfo]) -> str:
    """``3 node(s): 10.0.0.1 (1 holder, 7 io), ...`` for the logs."""
    by_node: dict[str | None, dict[str, int]] = {}
    for s in specs:
        roles = by_node.setdefault(s.node_id, {})
        for role in s.role.split("+"):
            roles[role] = roles.get(role, 0) + 1
    names = {n.node_id: n.address for n in nodes}
    parts = [f"{names.get(nid, nid)} (" + ", ".join(f"{v} {k}" for k, v in sorted(r.items()))
             + ")" for nid, r in by_node.items()]
    return f"{len(by_node)} node(s): " + "; ".join(parts)


__all__ = ["GPU_WORKER_CPUS", "NodeInfo", "WorkerSpec", "describe_plan", "plan_device_workers",
           "plan_pipeline", "use_gpus"]
