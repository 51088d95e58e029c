"""The one interface every executor implements (:class:`Executor`), what the pipelines and
the dispatcher (:mod:`safelora_ray.execution.dispatch`) talk to, and :func:`wind_down`.

Two executors implement it: :class:`~safelora_ray.execution.ray_executor.RayExecutor` (worker
actors planned per node) and :class:`~safelora_ray.execution.inline.InlineExecutor` (this
process). Workers are named by their index; a *handle* is what :meth:`Executor.submit`
returns for one call.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from safelora_ray.core.interrupts import grace_left
from safelora_ray.core.validate import env_number
from safelora_ray.execution.placement import NodeInfo, WorkerSpec

logger = logging.getLogger(__name__)

#: Seconds an interrupted run waits for the calls in flight to reach a safe point.
INTERRUPT_GRACE_S = env_number("SAFELORA_INTERRUPT_GRACE_S", 30)


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


class Executor(abc.ABC):
    """Runs task functions ``fn(context, *args)`` on workers named by index.

    Attributes:
        in_process: Whether the work runs in this process (no worker can die alone).
        owns_workers: Whether :meth:`close` stops the workers (False: a
            :func:`~safelora_ray.execution.session.worker_session` keeps them).
    """

    in_process: bool
    owns_workers: bool

    # -- the workers -----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Workers planned."""

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """What they compute on, for messages: ``GPU``, ``CPU`` or ``in-process``."""

    @abc.abstractmethod
    def usable(self, role: str | None = None) -> list[int]:
        """Indices of the workers (of ``role``: ``io``, ``holder``, ``device``) that can take
        work now."""

    @abc.abstractmethod
    def alive(self, role: str | None = None) -> list[int]:
        """Indices of the workers not dropped (ready or still starting)."""

    @abc.abstractmethod
    def lost(self, i: int, gone: str | None = None) -> bool:
        """After a call on worker ``i`` failed because its process died: whether it is back
        (False: dropped, its work must go elsewhere). ``gone``: someone already waited and
        gave up (why)."""

    @abc.abstractmethod
    def grow(self, plan_node: Callable[[NodeInfo], list[WorkerSpec]]) -> int:
        """Workers on nodes that joined since the run started (``plan_node`` plans a node's);
        returns how many were added."""

    @abc.abstractmethod
    def holder_index(self, i: int) -> int | None:
        """The index of worker ``i``'s holder of the alignment set (None: ``i`` holds it)."""

    @abc.abstractmethod
    def holder_of(self, i: int) -> Any | None:
        """The holder worker ``i`` sends its products to (None: ``i`` holds the set)."""

    # -- calls -----------------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, value: Any) -> Any:
        """``value`` shipped once, to be passed to many calls."""

    @abc.abstractmethod
    def submit(self, i: int, fn: Callable[..., Any], *args: Any, group: str = "batch") -> Any:
        """Run ``fn(context, *args)`` on worker ``i`` in concurrency group ``group``; returns
        the call's handle."""

    @abc.abstractmethod
    def worker_of(self, handle: Any) -> int:
        """The worker a call was submitted to."""

    @abc.abstractmethod
    def wait(self, handles: Sequence[Any], timeout_s: float, what: str) -> Any | None:
        """The next finished call of ``handles``, or None when only the workers changed (one
        came up, or was dropped): hand out work again.

        Raises:
            TimeoutError: none finished within ``timeout_s`` (``what`` names a call).
        """

    @abc.abstractmethod
    def result(self, handle: Any, timeout_s: float) -> Any:
        """The call's return value (or its error; a dead worker's is one of
        :data:`~safelora_ray.execution.actor.WORKER_LOST`)."""

    @abc.abstractmethod
    def notify(self, fn: Callable[..., Any], *args: Any, group: str = "stream",
               role: str | None = None) -> None:
        """Run ``fn(context, *args)`` on every live worker (of ``role``) without waiting."""

    # -- ending ----------------------------------------------------------------------------
    @abc.abstractmethod
    def cancel(self, token: str, timeout_s: float = 10.0) -> None:
        """Ask every worker to stop the tasks of run ``token`` at their next safe point."""

    @abc.abstractmethod
    def drain(self, handles: Sequence[Any], timeout_s: float) -> list[Any]:
        """Wait up to ``timeout_s`` for ``handles`` to finish; returns those still running."""

    @abc.abstractmethod
    def stop(self, handles: Sequence[Any], timeout_s: float = 30.0) -> None:
        """Stop the workers and wait (bounded) until ``handles`` have ended: nothing of
        theirs writes after this returns."""

    @abc.abstractmethod
    def close(self, ok: bool) -> None:
        """Release the workers (``ok``: the call ended normally)."""

    @abc.abstractmethod
    def check_shared(self, paths: Sequence[tuple[str, str, bool]]) -> None:
        """Refuse local paths (``(flag, path, is_output)``) the workers' nodes do not share
        with this one (:class:`~safelora_ray.core.errors.ConfigError`)."""


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


__all__ = ["INTERRUPT_GRACE_S", "Executor", "WorkerSlot", "wind_down"]
