"""The executor that runs in the driver process (:class:`InlineExecutor`): ``workers=0``, like
PyTorch's ``DataLoader(num_workers=0)``, and what ``workers=None`` picks for a small job, and
for any build, when no Ray cluster is configured (:mod:`safelora_ray.execution.resolve`)."""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from safelora_ray.core.alignment import full_precision_matmul
from safelora_ray.core.errors import ConfigError
from safelora_ray.execution.context import GROUPS, WorkerCore
from safelora_ray.execution.executor import Executor, WorkerSlot
from safelora_ray.execution.placement import NodeInfo, WorkerSpec

logger = logging.getLogger(__name__)


class InlineExecutor(Executor):
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

    def grow(self, plan_node: Callable[[NodeInfo], list[WorkerSpec]]) -> int:
        return 0  # this process is the only worker

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


__all__ = ["InlineExecutor"]
