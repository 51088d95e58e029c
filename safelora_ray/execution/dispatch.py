"""One dispatcher for every pipeline: tasks in, results out, workers kept busy.

A pipeline says *what* to run (:class:`Task`: a function, its arguments, an item it stands
for) and *how* (:class:`Policy`: how many tasks a worker holds at once, what happens when a
worker dies with a task in flight, whether the run grows onto new nodes). The dispatcher owns
the loop every pipeline used to write by hand: submit, wait, retry, isolate a suspect item,
grow, and wind down on Ctrl-C. It knows nothing of alignment sets or adapters (as Ray Data
keeps its scheduling policy apart from its operators).

Placement, in order:

1. Tasks to run *alone* (the parts of a task whose worker died, under ``Policy.isolate``) go
   first, each to an idle worker that takes nothing else until it answers; while one waits
   for an idle worker, no new task is handed out.
2. Retried tasks go next, then the follow-up tasks ``on_result`` returned, then new tasks in
   the order the pipeline gives them (taken one at a time, when a worker can take one).
3. A task pinned to a worker (``Task.pin``: state lives there, e.g. a shard's open writer)
   goes to that worker, or to the one that took its place if the worker was lost for good;
   ``Policy.in_flight`` does not limit it (the worker's concurrency group orders its calls),
   but it waits while its worker runs a task alone. Any other task goes to the least loaded
   usable worker of ``Policy.role`` with fewer than ``Policy.in_flight`` tasks.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from safelora_ray.core import interrupts
from safelora_ray.core.errors import ClusterError
from safelora_ray.execution.actor import WORKER_LOST
from safelora_ray.execution.executor import Executor, wind_down

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Task:
    """One call ``fn(ctx, *args)`` on a worker.

    Args:
        fn: A module-level function taking the worker's context first.
        args: Its arguments, or a function of the chosen worker's index that returns them
            (for an argument that depends on the worker, e.g. its node's holder).
        item: What the task stands for; the pipeline's callbacks get it back.
        pin: The worker it must run on (its state lives there); None: any.
        parts: Under ``Policy.isolate``, the tasks to run alone in its place if its worker
            dies with it (e.g. one per adapter of a batch); None: the task itself.
        group: The actor's concurrency group.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] | Callable[[int], tuple[Any, ...]] = ()
    item: Any = None
    pin: int | None = None
    parts: Callable[[], list[Task]] | None = None
    group: str = "batch"
    runs: int = field(default=0, init=False)  # times submitted
    worker: int | None = field(default=None, init=False)  # where it ran last
    alone: bool = field(default=False, init=False)


#: What the dispatcher needs of an executor: the one executor interface.
WorkerPool = Executor


@dataclass(frozen=True)
class Policy:
    """How a pipeline's tasks are run (see the module docstring).

    Args:
        what: Names a task in a timeout's message ("adapter batch").
        timeout_s: Seconds a task may take.
        token: The run's id: Ctrl-C cancels the tasks carrying it.
        role: The workers that take unpinned tasks (None: all).
        in_flight: Tasks a worker holds at once (None: no limit).
        attempts: Runs of a task whose worker died; then ``on_failed``.
        isolate: A task whose worker died is replaced by its parts, each run alone; a part
            that dies alone goes to ``on_failed`` (a poison item fails alone, its batch-mates
            do not).
        grow_every_s: Seconds between two looks for new nodes (None: a fixed pool).
        plan_node: The workers a new node gets (with ``grow_every_s``).
        lost_errors: The errors that mean "the worker died", not "the task failed".
        mark_lost: Tells the executor which worker died (default ``ex.lost(i)``); returns
            whether it comes back.
        mark_last_loss: Whether a task out of attempts (not under ``isolate``) still tells
            the executor (which waits for the worker to come back) before ``on_failed``;
            False: ``on_failed`` at once.
    """

    what: str
    timeout_s: float
    token: str
    role: str | None = None
    in_flight: int | None = 1
    attempts: int = 1
    isolate: bool = False
    grow_every_s: float | None = None
    plan_node: Callable[[Any], list[Any]] | None = None
    lost_errors: tuple[type[BaseException], ...] = WORKER_LOST
    mark_lost: Callable[[Any, int, BaseException], bool] | None = None
    mark_last_loss: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.in_flight is not None and self.in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {self.in_flight}")
        if self.grow_every_s is not None and self.plan_node is None:
            raise ValueError("grow_every_s needs plan_node")


OnResult = Callable[[Task, Any], Iterable[Task] | None]
OnFailed = Callable[[Task, BaseException], None]


def _give_up(task: Task, error: BaseException) -> None:
    raise ClusterError(f"{task.item}: its worker died {task.runs} time(s) "
                       f"({type(error).__name__})") from error


class Dispatcher:
    """Runs tasks on an executor's workers under a :class:`Policy`."""

    def __init__(self, ex: Executor, policy: Policy) -> None:
        self.ex = ex
        self.policy = policy
        self._pending: dict[Any, tuple[int, Task]] = {}
        self._load: collections.Counter[int] = collections.Counter()
        self._alone: set[int] = set()  # workers running a task alone
        self._moved: dict[int, int] = {}  # worker lost for good → the one that took its pins
        self._isolated: collections.deque[Task] = collections.deque()
        self._retry: collections.deque[Task] = collections.deque()
        self._next: Task | None = None  # taken from the pipeline's tasks, not placed yet

    def run(self, tasks: Iterable[Task], on_result: OnResult,
            on_failed: OnFailed = _give_up) -> None:
        """Run every task (and those ``on_result`` returns) to the end.

        Raises:
            KeyboardInterrupt: after the work in flight wound down (``wind_down``).
            What ``on_result``/``on_failed`` raise; a task's own error from its worker.
        """
        source: Iterator[Task] = iter(tasks)
        follow: collections.deque[Task] = collections.deque()
        p = self.policy
        next_grow = time.monotonic() + (p.grow_every_s or 0.0)
        exhausted = False
        try:
            while True:
                if p.grow_every_s is not None and time.monotonic() >= next_grow:
                    assert p.plan_node is not None
                    self.ex.grow(p.plan_node)
                    next_grow = time.monotonic() + p.grow_every_s
                exhausted = self._place(source, follow, exhausted)
                if not self._pending and exhausted and self._next is None and not (
                        follow or self._retry or self._isolated):
                    return
                ref = self.ex.wait(list(self._pending), p.timeout_s, p.what)
                if ref is None:  # a worker came up or was dropped: hand out work again
                    continue
                i, task = self._pending.pop(ref)
                self._load[i] -= 1
                self._alone.discard(i)
                try:
                    result = self.ex.result(ref, p.timeout_s)
                except p.lost_errors as e:
                    self._lost(i, task, e, on_failed)
                    continue
                follow.extend(on_result(task, result) or ())
        except KeyboardInterrupt:
            wind_down(self.ex, p.token, list(self._pending))
            raise

    # -- placement -------------------------------------------------------------------------

    def _place(self, source: Iterator[Task], follow: collections.deque[Task],
               exhausted: bool) -> bool:
        """Hands out work until no worker can take more; returns whether ``source`` ran out."""
        p = self.policy
        while self._isolated:
            idle = [i for i in self.ex.usable(p.role) if self._load[i] == 0]
            if not idle:
                return exhausted  # the rest waits until the suspects have their workers
            task = self._isolated.popleft()
            task.alone = True
            self._alone.add(idle[0])
            self._submit(idle[0], task)
        while True:
            if self._retry:
                task = self._retry[0]
            elif follow:
                task = follow[0]
            elif self._next is not None:
                task = self._next
            elif not exhausted:
                self._next = next(source, None)
                exhausted = self._next is None
                continue
            else:
                return exhausted
            i = self._worker_for(task)
            if i is None:
                return exhausted
            if self._retry:
                self._retry.popleft()
            elif follow:
                follow.popleft()
            else:
                self._next = None
            self._submit(i, task)

    def _worker_for(self, task: Task) -> int | None:
        if task.pin is not None:
            i = self._pinned_to(task.pin)
            # Not beside a suspect running alone; otherwise pins ignore in_flight (the
            # worker's own concurrency group orders them).
            return None if i in self._alone else i
        limit = self.policy.in_flight
        free = [i for i in self.ex.usable(self.policy.role)
                if i not in self._alone and (limit is None or self._load[i] < limit)]
        return min(free, key=lambda i: (self._load[i], i)) if free else None

    def _pinned_to(self, pin: int) -> int:
        """The worker that holds ``pin``'s tasks now (it, or the one that took its place)."""
        while pin in self._moved:
            pin = self._moved[pin]
        return pin

    def _submit(self, i: int, task: Task) -> None:
        task.runs += 1
        task.worker = i
        args = task.args(i) if callable(task.args) else task.args
        with interrupts.held():  # a call handed out is in _pending: the wind-down waits for it
            self._pending[self.ex.submit(i, task.fn, *args, group=task.group)] = (i, task)
        self._load[i] += 1

    # -- a worker died with the task -------------------------------------------------------

    def _lost(self, i: int, task: Task, error: BaseException, on_failed: OnFailed) -> None:
        p = self.policy
        if not p.mark_last_loss and not p.isolate and task.runs >= p.attempts:
            on_failed(task, error)  # not run again: no need to wait for its worker
            return
        back = p.mark_lost(self.ex, i, error) if p.mark_lost else self.ex.lost(i)
        if p.isolate:
            if task.alone:
                on_failed(task, error)
                return
            parts = task.parts() if task.parts else [task]
            logger.warning("a worker died (%s) with work in flight (%s); running each of its %d "
                           "part(s) alone", type(error).__name__, p.what, len(parts))
            self._isolated.extend(parts)
            return
        if task.runs >= p.attempts:
            on_failed(task, error)
            return
        if task.pin is not None and not back and i not in self._moved:
            # Lost for good (its node too, maybe): the least loaded live worker takes its pins
            # (once: the other tasks it had in flight follow them there).
            live = [w for w in self.ex.alive(p.role) if w != i and w not in self._moved]
            if not live:
                raise ClusterError(f"{task.item}: no worker left to run it") from error
            self._moved[i] = min(live, key=lambda w: (self._load[w], w))
            logger.warning("%s goes to worker %d (worker %d was lost)", task.item,
                           self._moved[i], i)
        logger.warning("the worker running %s died (%s); running it again", task.item,
                       type(error).__name__)
        self._retry.append(task)


__all__ = ["Dispatcher", "OnFailed", "OnResult", "Policy", "Task", "WorkerPool"]
