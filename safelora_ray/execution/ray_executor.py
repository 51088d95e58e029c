"""The executor of worker actors planned per node (:class:`RayExecutor`), and the plan it
runs (:class:`WorkerPlan`).

A worker whose process dies is restarted by Ray on its node; a worker whose node is lost (or
that cannot come back within :data:`~safelora_ray.execution.actor.REJOIN_TIMEOUT_S`) is
dropped, and the run goes on with the others. A worker that is not up within
:data:`~safelora_ray.execution.actor.START_TIMEOUT_S` is dropped too: work starts on the
first ready worker and never waits on one that cannot be placed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from safelora_ray.core.errors import ClusterError
from safelora_ray.execution import shared_paths
from safelora_ray.execution.actor import (
    REJOIN_TIMEOUT_S,
    START_TIMEOUT_S,
    live_nodes,
    wait_back,
)
from safelora_ray.execution.executor import Executor, WorkerSlot
from safelora_ray.execution.placement import NodeInfo, WorkerSpec, describe_plan
from safelora_ray.execution.ray_utils import get_unwrapped, worker_runtime_env
from safelora_ray.execution.relay import Relayed, relay
from safelora_ray.execution.session import WorkerSession, active_session

logger = logging.getLogger(__name__)


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


class RayExecutor(Executor):
    """Runs task functions on worker actors planned per node (those of the active
    :func:`~safelora_ray.execution.session.worker_session`, else actors of its own, stopped
    by :meth:`close`).

    Indices name the workers of the plan, in order; :meth:`usable` says which can take work
    now. A handle returned by :meth:`wait` is one of those :meth:`submit` returned, or None
    when only the workers changed (one came up, or was dropped): the driver loop then hands
    out work again.
    """

    in_process = False

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        shared = active_session()
        self.owns_workers = shared is None
        self.session = shared if shared is not None else WorkerSession()
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
        :data:`~safelora_ray.execution.actor.START_TIMEOUT_S`)."""
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
        """The call's return value; raises one of
        :data:`~safelora_ray.execution.actor.WORKER_LOST` if its worker died. The log records
        the call emitted on its worker are emitted here first."""
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

        Every node that hosts a worker must see the same directory at each local path (see
        :mod:`safelora_ray.execution.shared_paths`).

        Args:
            paths: ``(flag, local path, is_output)``.

        Raises:
            ConfigError: naming the path, the flag and the node that does not share it.
        """
        here = ray.get_runtime_context().get_node_id()
        nodes = sorted({s.spec.node_id for s in self.slots if s.spec.node_id not in (None, here)
                        and s.state != "dropped"})
        names = {n.node_id: n.address for n in self.plan.nodes}
        shared_paths.check_shared(nodes, names, paths)  # type: ignore[arg-type]


def _has_role(spec: WorkerSpec, role: str) -> bool:
    if role == "io":
        return spec.does_io
    if role == "holder":
        return spec.holds_set
    return spec.role == role


__all__ = ["RayExecutor", "WorkerPlan"]
