"""The worker actor (:class:`SafeLoraWorker`), the cluster's nodes it is pinned to, and how an
actor is started, stopped and waited for after its process died.

Ray restarts a dead worker process on its node, without limit: each death is an event the
driver sees (a poison adapter fails alone, the worker serves the rest). Calls are never
retried by Ray: the driver decides what to run again, and where (a batch in flight on a lost
node goes to another node; a retried batch's adapters are found in the ledger).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from safelora_ray.core.alignment import full_precision_matmul
from safelora_ray.core.validate import env_number
from safelora_ray.execution.context import CONTROL_GROUP, GROUPS, WorkerCore
from safelora_ray.execution.memory import keep_freed_memory
from safelora_ray.execution.placement import NodeInfo, WorkerSpec
from safelora_ray.execution.ray_utils import pick_device
from safelora_ray.execution.relay import Relayed, _Relay

logger = logging.getLogger(__name__)

#: Exceptions that mean a worker process (or its node) died: its call may have been lost
#: with it, or its result (stored on the lost node).
WORKER_LOST: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
    ray.exceptions.ActorUnschedulableError, ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError)

#: Seconds a new worker may take to come up (placed, started, torch imported) before it is
#: dropped; the run proceeds with the workers that did.
START_TIMEOUT_S = env_number("SAFELORA_WORKER_START_TIMEOUT_S", 180)
#: Seconds a worker whose process died may take to be restarted on its node before it is
#: dropped (a lost node's workers are dropped at once).
REJOIN_TIMEOUT_S = env_number("SAFELORA_WORKER_REJOIN_TIMEOUT_S", 60)


def _configure_process(num_gpus: float) -> str:
    device = pick_device(num_gpus)
    if device == "cpu":
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        torch.set_num_threads(cpus)
    full_precision_matmul()  # no TF32: SPEC equality needs full float32 products
    keep_freed_memory()  # batches free and allocate the same sizes again: no page faults
    # What is loaded by now (torch's and Ray's modules: ~200k objects) lives as long as the
    # process; frozen, it is no longer walked by every full collection a batch triggers.
    gc.freeze()
    return device


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


__all__ = ["REJOIN_TIMEOUT_S", "START_TIMEOUT_S", "WORKER_LOST", "SafeLoraWorker",
           "live_nodes", "wait_back"]
