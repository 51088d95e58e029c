"""The execution layer: where pipeline work runs, on worker actors spread over the cluster's
nodes or in this process. It sits below the pipelines (build, sanitize, ...), knows none of
them, and imports only :mod:`safelora_ray.core`. This package re-exports its public names.

A pipeline's work is a *task function* ``fn(context, *args)``, a module-level function of the
pipeline's module (shipped to workers by reference). It runs on a worker against a
:class:`WorkerContext` (:mod:`.context`): the device the worker computes on and *slots* of
state kept between calls (a shard builder's reader threads, an alignment set resident on the
GPU). :class:`WorkerCore` holds that context; :class:`SafeLoraWorker` (:mod:`.actor`) is the
core as a Ray actor, and sends back the log records of each call with its result
(:mod:`.relay`).

Workers are planned per node (:mod:`.placement`) and pinned to their node. The pipelines talk
to an :class:`Executor` (:mod:`.executor`), usually through the :class:`Dispatcher`
(:mod:`.dispatch`):

- :class:`RayExecutor` (:mod:`.ray_executor`) runs on worker actors. A worker whose process
  dies is restarted by Ray on its node; one whose node is lost (or that cannot come back
  within :data:`REJOIN_TIMEOUT_S`) is dropped, and the run goes on with the others. Inside
  :func:`worker_session` (:mod:`.session`) the actors are shared by every call; outside one,
  each call starts its own and stops them when it returns.
- :class:`InlineExecutor` (:mod:`.inline`) runs in the driver process (``workers=0``), and is
  what ``workers=None`` picks for a small job, and for any build, when no Ray cluster is
  configured (:mod:`.resolve`).
"""

from safelora_ray.execution.actor import (
    REJOIN_TIMEOUT_S,
    START_TIMEOUT_S,
    WORKER_LOST,
    SafeLoraWorker,
    live_nodes,
    wait_back,
)
from safelora_ray.execution.context import CONTROL_GROUP, GROUPS, WorkerContext, WorkerCore
from safelora_ray.execution.dispatch import Dispatcher, Policy, Task
from safelora_ray.execution.executor import Executor, WorkerSlot, wind_down
from safelora_ray.execution.inline import InlineExecutor
from safelora_ray.execution.ray_executor import RayExecutor, WorkerPlan
from safelora_ray.execution.relay import Relayed, relay
from safelora_ray.execution.resolve import (
    INLINE_MAX_BUILD_BYTES,
    cluster_configured,
    in_process,
    inline_max_adapters,
    open_executor,
    resolve_workers,
)
from safelora_ray.execution.session import WorkerSession, worker_session

__all__ = [
    "CONTROL_GROUP",
    "GROUPS",
    "INLINE_MAX_BUILD_BYTES",
    "REJOIN_TIMEOUT_S",
    "START_TIMEOUT_S",
    "WORKER_LOST",
    "Dispatcher",
    "Executor",
    "InlineExecutor",
    "Policy",
    "RayExecutor",
    "Relayed",
    "SafeLoraWorker",
    "Task",
    "WorkerContext",
    "WorkerCore",
    "WorkerPlan",
    "WorkerSession",
    "WorkerSlot",
    "cluster_configured",
    "in_process",
    "inline_max_adapters",
    "live_nodes",
    "open_executor",
    "relay",
    "resolve_workers",
    "wait_back",
    "wind_down",
    "worker_session",
]
