"""A worker actor class that can die like a segfaulting or OOM-killed process, for tests: the
real worker's protocol (``ready`` / ``cancel`` in the control group, ``call`` dispatched into
groups), restarted by Ray on its node as the real one is, with a hook run before every call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from safelora_ray.execution.context import CONTROL_GROUP, GROUPS, WorkerCore


def crashing_worker(before_call: Callable[[Callable[..., Any], tuple[Any, ...]], None]) -> Any:
    """A ``SafeLoraWorker`` stand-in whose ``call(fn, *args)`` first runs
    ``before_call(fn, args)`` (which may ``os._exit``). Ray ships the class by value, so the
    hook may close over the test's own objects."""

    @ray.remote(max_restarts=-1, max_task_retries=0,
                concurrency_groups={**GROUPS, CONTROL_GROUP: 1})
    class Crashy:
        def __init__(self, num_gpus: float, log_level: int | None = None) -> None:
            self.core = WorkerCore("cpu", ray.get_runtime_context().get_node_id())

        @ray.method(concurrency_group=CONTROL_GROUP)
        def ready(self) -> str:
            return "cpu"

        @ray.method(concurrency_group=CONTROL_GROUP)
        def cancel(self, token: str) -> None:
            self.core.context.cancel(token)

        def call(self, fn: Callable[..., Any], *args: Any) -> Any:
            before_call(fn, args)
            return self.core.call(fn, *args)

    return Crashy
