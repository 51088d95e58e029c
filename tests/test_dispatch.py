"""The dispatcher (:mod:`safelora_ray.execution.dispatch`) against a small fake executor in
this process: placement, in-flight limits, pins, retries, isolation of a suspect, follow-up
tasks, growth and Ctrl-C. No Ray: each call runs when the dispatcher asks for its result."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from safelora_ray.core import interrupts
from safelora_ray.core.errors import ClusterError
from safelora_ray.execution import Executor, InlineExecutor, RayExecutor
from safelora_ray.execution.dispatch import Dispatcher, Policy, Task, WorkerPool
from safelora_ray.execution.placement import NodeInfo, WorkerSpec


class Died(Exception):
    """A worker's process died with the call (the lost error of these policies)."""


@dataclass(eq=False)
class Call:
    """A call submitted to the fake executor: its handle."""

    worker: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    group: str
    load: int  # calls of its worker in flight when it was submitted (itself excluded)


@dataclass
class Ctx:
    """What a task function gets as its context here."""

    worker: int


class FakeExecutor(Executor):
    """``n`` workers in this process. A call runs when its result is asked for; ``wait``
    answers the oldest call submitted. A call on a worker in ``dead`` raises :class:`Died`
    (as does a task function that kills its worker); ``lost`` answers ``back(i)``, and a
    worker that does not come back is dropped."""

    in_process = True
    owns_workers = True
    kind = "fake"

    def __init__(self, n: int = 2, roles: Sequence[str] | None = None,
                 back: Callable[[int], bool] = lambda i: True) -> None:
        self.roles = list(roles or ["device"] * n)
        self.back = back
        self.dead: set[int] = set()
        self.dropped: set[int] = set()
        self.log: list[Call] = []  # every submission, in order
        self.pending: list[Call] = []
        self.lost_calls: list[int] = []
        self.grown = 0
        self.grow_adds: list[str] = []  # roles of the workers the next grows add
        self.ended: list[tuple[str, Any]] = []  # cancel / drain / stop, in order
        self.before_wait: Callable[[FakeExecutor], None] | None = None

    # -- the workers ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.roles)

    def usable(self, role: str | None = None) -> list[int]:
        return [i for i, r in enumerate(self.roles)
                if i not in self.dropped and (role is None or r == role)]

    def alive(self, role: str | None = None) -> list[int]:
        return self.usable(role)

    def lost(self, i: int, gone: str | None = None) -> bool:
        self.lost_calls.append(i)
        if i in self.dropped:
            return False
        if self.back(i):
            self.dead.discard(i)
            return True
        self.dropped.add(i)
        return False

    def grow(self, plan_node: Callable[[NodeInfo], list[WorkerSpec]]) -> int:
        self.grown += 1
        if not self.grow_adds:
            return 0
        self.roles.append(self.grow_adds.pop(0))
        return 1

    def holder_index(self, i: int) -> int | None:
        return None

    def holder_of(self, i: int) -> Any | None:
        return None

    # -- calls ---------------------------------------------------------------------------
    def put(self, value: Any) -> Any:
        return value

    def submit(self, i: int, fn: Callable[..., Any], *args: Any, group: str = "batch") -> Call:
        assert i not in self.dropped, f"a call was sent to dropped worker {i}"
        call = Call(i, fn, args, group, sum(c.worker == i for c in self.pending))
        self.log.append(call)
        self.pending.append(call)
        return call

    def worker_of(self, handle: Call) -> int:
        return handle.worker

    def wait(self, handles: Sequence[Call], timeout_s: float, what: str) -> Call | None:
        if self.before_wait is not None:
            self.before_wait(self)
        waiting = [c for c in self.pending if c in handles]
        assert waiting, "the dispatcher waits on nothing: it would hang"
        return waiting[0]

    def result(self, handle: Call, timeout_s: float) -> Any:
        self.pending.remove(handle)
        if handle.worker in self.dead or handle.worker in self.dropped:
            raise Died(f"worker {handle.worker}")
        return handle.fn(Ctx(handle.worker), *handle.args)

    def notify(self, fn: Callable[..., Any], *args: Any, group: str = "stream",
               role: str | None = None) -> None:
        for i in self.alive(role):
            fn(Ctx(i), *args)

    # -- ending --------------------------------------------------------------------------
    def cancel(self, token: str, timeout_s: float = 10.0) -> None:
        self.ended.append(("cancel", token))

    def drain(self, handles: Sequence[Any], timeout_s: float) -> list[Any]:
        self.ended.append(("drain", list(handles)))
        return list(handles)

    def stop(self, handles: Sequence[Any], timeout_s: float = 30.0) -> None:
        self.ended.append(("stop", list(handles)))

    def close(self, ok: bool) -> None:
        pass

    def check_shared(self, paths: Sequence[tuple[str, str, bool]]) -> None:
        pass

    # -- for the assertions --------------------------------------------------------------
    def items(self, worker: int | None = None) -> list[Any]:
        """The first argument of each call (its item), in submission order."""
        return [c.args[0] for c in self.log if worker is None or c.worker == worker]


# Task functions (module level, as a pipeline's are).

def echo(ctx: Ctx, item: Any) -> Any:
    return item


def slow(ctx: Ctx, item: Any) -> Any:
    time.sleep(0.02)
    return item


def batch(ctx: Ctx, items: tuple[str, ...]) -> tuple[str, ...]:
    """Kills its worker when it holds a poison item (a segfault, an OOM kill)."""
    if any(x.startswith("poison") for x in items):
        raise Died("poison")
    return items


def where(ctx: Ctx, item: Any, worker: int) -> tuple[Any, int, int]:
    return item, worker, ctx.worker


def _policy(**kw: Any) -> Policy:
    return Policy(**{"what": "test task", "timeout_s": 5.0, "token": "run-1",
                     "lost_errors": (Died,), **kw})


def _run(ex: FakeExecutor, policy: Policy, tasks: list[Task],
         on_result: Callable[[Task, Any], Any] | None = None,
         on_failed: Callable[[Task, BaseException], None] | None = None
         ) -> tuple[dict[Any, Any], list[tuple[Any, BaseException]]]:
    results: dict[Any, Any] = {}
    failed: list[tuple[Any, BaseException]] = []

    def done(task: Task, result: Any) -> Any:
        results[task.item] = result
        return on_result(task, result) if on_result else None

    def fail(task: Task, e: BaseException) -> None:
        failed.append((task.item, e))
        if on_failed:
            on_failed(task, e)

    Dispatcher(ex, policy).run(tasks, done, fail)
    return results, failed


# ---------------------------------------------------------------------------------------------
# The one executor interface
# ---------------------------------------------------------------------------------------------


def test_both_executors_implement_the_one_interface():
    assert WorkerPool is Executor
    for cls in (RayExecutor, InlineExecutor):
        assert issubclass(cls, Executor)
        assert not getattr(cls, "__abstractmethods__", None), cls


def test_runs_on_the_in_process_executor():
    ex = InlineExecutor(use_gpu=False)
    try:
        results: dict[int, Any] = {}
        Dispatcher(ex, Policy("test task", 30.0, "run-1", in_flight=2)).run(
            [Task(echo, (k,), item=k) for k in range(7)],
            lambda t, r: results.__setitem__(t.item, r))
    finally:
        ex.close(True)
    assert results == {k: k for k in range(7)}
    assert ex.grow(lambda node: []) == 0


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


def test_in_flight_limits_each_worker():
    ex = FakeExecutor(2)
    results, failed = _run(ex, _policy(in_flight=2), [Task(echo, (k,), item=k)
                                                       for k in range(9)])
    assert results == {k: k for k in range(9)} and not failed
    assert max(c.load for c in ex.log) == 1  # at most 2 calls per worker in flight
    # Both workers were filled to the limit before the first answer was awaited.
    assert [c.worker for c in ex.log[:4]] == [0, 1, 0, 1]


def test_no_limit_hands_out_everything_at_once():
    ex = FakeExecutor(2)
    before: list[int] = []
    ex.before_wait = lambda fake: before.append(len(fake.log))
    _run(ex, _policy(in_flight=None), [Task(echo, (k,), item=k) for k in range(6)])
    assert before[0] == 6


def test_least_loaded_worker_of_the_role_takes_the_next_task():
    ex = FakeExecutor(roles=["device", "io", "device", "device"])
    _run(ex, _policy(in_flight=None, role="device"), [Task(echo, (k,), item=k)
                                                      for k in range(7)])
    assert [c.worker for c in ex.log] == [0, 2, 3, 0, 2, 3, 0]
    assert not ex.items(1)


def test_a_freed_worker_takes_the_next_task():
    ex = FakeExecutor(3)
    _run(ex, _policy(in_flight=1), [Task(echo, (k,), item=k) for k in range(5)])
    # 0, 1, 2 at once; 0 answers first and takes 3, then 1 answers and takes 4.
    assert [c.worker for c in ex.log] == [0, 1, 2, 0, 1]


def test_task_args_may_depend_on_the_worker():
    ex = FakeExecutor(2)
    results, _ = _run(ex, _policy(), [Task(where, lambda i, k=k: (k, i), item=k)
                                      for k in range(4)])
    assert all(worker == ran_on for _, worker, ran_on in results.values())


def test_pinned_tasks_go_to_their_worker_whatever_its_load():
    ex = FakeExecutor(3)
    tasks = [Task(echo, (f"p{k}",), item=f"p{k}", pin=2, group="stream") for k in range(3)]
    tasks += [Task(echo, (f"u{k}",), item=f"u{k}") for k in range(2)]
    results, _ = _run(ex, _policy(in_flight=1), tasks)
    assert len(results) == 5
    assert ex.items(2)[:3] == ["p0", "p1", "p2"]
    assert {c.group for c in ex.log if c.worker == 2} >= {"stream"}
    assert ex.items(0) == ["u0"] and ex.items(1) == ["u1"]


# ---------------------------------------------------------------------------------------------
# A worker died with a task
# ---------------------------------------------------------------------------------------------


def test_a_task_whose_worker_came_back_runs_again_there():
    ex = FakeExecutor(2)
    deaths = iter([True])

    def flaky(ctx: Ctx, item: Any) -> Any:
        if item == "x" and next(deaths, False):
            raise Died("once")
        return item

    results, failed = _run(ex, _policy(attempts=2), [
        Task(flaky, ("x",), item="x", pin=1), Task(flaky, ("y",), item="y")])
    assert results == {"x": "x", "y": "y"} and not failed
    assert ex.items(1) == ["x", "x"] and ex.lost_calls == [1]


def test_pins_of_a_worker_lost_for_good_move_to_one_live_worker_once():
    """Two calls were in flight on worker 0 when it was lost: both, and every later task
    pinned to it, go to the one worker that took its place; that worker keeps its own pins
    (the second loss report is no reason to move them again)."""
    ex = FakeExecutor(3, back=lambda i: False)
    ex.dead.add(0)
    tasks = [Task(echo, (name,), item=name, pin=pin, group="stream")
             for name, pin in [("a0", 0), ("b0", 0), ("c1", 1), ("d2", 2), ("e0", 0),
                               ("f1", 1)]]
    results, failed = _run(ex, _policy(in_flight=None, attempts=3), tasks)
    assert sorted(results) == ["a0", "b0", "c1", "d2", "e0", "f1"] and not failed
    last = {}
    for c in ex.log:
        last[c.args[0]] = c.worker
    taker = last["a0"]
    assert taker in (1, 2)
    assert last["b0"] == last["e0"] == taker
    assert last["c1"] == last["f1"] == 1 and last["d2"] == 2
    assert 0 in ex.dropped


def test_pins_move_to_the_least_loaded_live_worker():
    ex = FakeExecutor(3, back=lambda i: False)
    ex.dead.add(1)
    tasks = [Task(echo, ("x",), item="x", pin=1)] + [
        Task(echo, (f"z{k}",), item=f"z{k}", pin=0) for k in range(3)]
    _run(ex, _policy(in_flight=None, attempts=2), tasks)
    assert ex.items(2) == ["x"]  # worker 0 had two more calls in flight, worker 2 none


def test_no_live_worker_left_for_a_pin_is_a_cluster_error():
    ex = FakeExecutor(1, back=lambda i: False)
    ex.dead.add(0)
    with pytest.raises(ClusterError, match="no worker left to run it"):
        _run(ex, _policy(attempts=3), [Task(echo, ("a",), item="a", pin=0)])


def test_attempts_then_on_failed():
    ex = FakeExecutor(2)

    def dies_on_x(ctx: Ctx, item: Any) -> Any:
        if item == "x":
            raise Died("again")
        return item

    results, failed = _run(ex, _policy(attempts=3), [
        Task(dies_on_x, (k,), item=k) for k in ("a", "x", "b")])
    assert results == {"a": "a", "b": "b"}
    assert [item for item, _ in failed] == ["x"] and isinstance(failed[0][1], Died)
    assert ex.items().count("x") == 3


def test_by_default_a_task_out_of_attempts_fails_the_run():
    ex = FakeExecutor(1)
    ex.dead.add(0)  # comes back after every death, and dies again

    def always_dead(fake: FakeExecutor) -> None:
        fake.dead.add(0)

    ex.before_wait = always_dead
    with pytest.raises(ClusterError, match=r"x: its worker died 2 time\(s\) \(Died\)"):
        Dispatcher(ex, _policy(attempts=2)).run([Task(echo, ("x",), item="x")],
                                                lambda t, r: None)


def test_a_task_error_is_not_a_lost_worker():
    ex = FakeExecutor(1)

    def broken(ctx: Ctx, item: Any) -> Any:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        _run(ex, _policy(attempts=3), [Task(broken, ("x",), item="x")])
    assert not ex.lost_calls and len(ex.log) == 1


def test_mark_lost_replaces_the_executors_own():
    ex = FakeExecutor(2)
    seen: list[tuple[int, str]] = []

    def mark(fake: Any, i: int, e: BaseException) -> bool:
        seen.append((i, type(e).__name__))
        return True

    deaths = iter([True])

    def once(ctx: Ctx, item: Any) -> Any:
        if next(deaths, False):
            raise Died("once")
        return item

    results, _ = _run(ex, _policy(attempts=2, mark_lost=mark), [Task(once, ("a",), item="a")])
    assert results == {"a": "a"} and seen == [(0, "Died")] and not ex.lost_calls


# ---------------------------------------------------------------------------------------------
# Isolating a suspect
# ---------------------------------------------------------------------------------------------


def _batches(*groups: tuple[str, ...]) -> list[Task]:
    def task(items: tuple[str, ...]) -> Task:
        return Task(batch, (items,), item=items,
                    parts=lambda: [Task(batch, ((x,),), item=(x,)) for x in items])
    return [task(g) for g in groups]


def test_isolate_runs_the_parts_alone_and_only_the_poison_fails():
    ex = FakeExecutor(2)
    results, failed = _run(ex, _policy(isolate=True, in_flight=1), _batches(
        ("a", "b"), ("c", "poison-d", "e"), ("f", "g")))
    assert set(results) == {("a", "b"), ("c",), ("e",), ("f", "g")}
    assert [item for item, _ in failed] == [("poison-d",)]
    # A part ran alone: nothing else was in flight on its worker, then or while it ran.
    for k, c in enumerate(ex.log):
        if len(c.args[0]) == 1:
            assert c.load == 0
            answered = next(j for j, d in enumerate(ex.log) if d is c)
            assert all(d.worker != c.worker for d in ex.log[k + 1:answered + 1])
    assert ex.items().count(("poison-d",)) == 1  # dies alone once: on_failed, no retry


def test_isolate_holds_new_work_while_a_suspect_waits_for_an_idle_worker():
    ex = FakeExecutor(2)
    tasks = _batches(("poison-a", "b"), ("c",), ("d",), ("e",), ("f",), ("g",), ("h",))
    results, failed = _run(ex, _policy(isolate=True, in_flight=2), tasks)
    order = ex.items()
    # Both workers were full (2 each); after the death, worker 0 still had ("c",) in flight:
    # no new batch went anywhere until the parts had an idle worker each.
    first_part = order.index(("poison-a",))
    assert order.index(("b",)) < order.index(("f",))
    assert first_part < order.index(("f",))
    assert order[:4] == [("poison-a", "b"), ("c",), ("d",), ("e",)]
    assert [item for item, _ in failed] == [("poison-a",)]
    assert set(results) >= {("b",), ("c",), ("d",), ("e",), ("f",), ("g",), ("h",)}


def test_a_pinned_task_waits_while_its_worker_runs_a_suspect_alone():
    ex = FakeExecutor(2)

    def pin_after_c(task: Task, result: Any) -> list[Task]:
        return [Task(batch, (("p",),), item="p", pin=0)] if result == ("c",) else []

    # The batch dies on worker 0: "poison-a" runs alone there; then "c" answers on worker 1
    # and asks for "p" on worker 0, while "poison-a" still runs alone on it.
    results, failed = _run(ex, _policy(isolate=True, in_flight=1),
                           _batches(("poison-a", "b"), ("c",)), pin_after_c)
    assert "p" in results and [item for item, _ in failed] == [("poison-a",)]
    suspect = next(k for k, c in enumerate(ex.log) if c.args[0] == ("poison-a",))
    p = next(k for k, c in enumerate(ex.log) if c.args[0] == ("p",))
    assert ex.log[suspect].worker == ex.log[p].worker == 0
    assert p > suspect and ex.log[p].load == 0  # only once the suspect had answered


# ---------------------------------------------------------------------------------------------
# Follow-up tasks, growth, Ctrl-C
# ---------------------------------------------------------------------------------------------


def test_follow_up_tasks_from_on_result_run_before_new_ones():
    ex = FakeExecutor(1)

    def more(task: Task, result: Any) -> list[Task]:
        if isinstance(result, int) and result < 2:
            return [Task(echo, (result + 1,), item=result + 1)]
        return []

    results, _ = _run(ex, _policy(in_flight=1), [Task(echo, (0,), item=0),
                                                  Task(echo, ("new",), item="new")], more)
    assert set(results) == {0, 1, 2, "new"}
    assert ex.items() == [0, 1, 2, "new"]


def test_grow_every_grow_every_s():
    ex = FakeExecutor(1)
    ex.grow_adds = ["device"]
    plans: list[Any] = []

    def plan_node(node: NodeInfo) -> list[WorkerSpec]:
        plans.append(node)
        return []

    results, _ = _run(ex, _policy(in_flight=1, grow_every_s=0.01, plan_node=plan_node),
                      [Task(slow, (k,), item=k) for k in range(8)])
    assert len(results) == 8
    assert ex.grown >= 3
    assert ex.items(1), "the worker added by grow took no work"


def test_no_grow_before_grow_every_s_nor_without_it():
    ex = FakeExecutor(1)
    _run(ex, _policy(grow_every_s=60.0, plan_node=lambda node: []),
         [Task(echo, (k,), item=k) for k in range(3)])
    assert ex.grown == 0
    ex = FakeExecutor(1)
    _run(ex, _policy(), [Task(slow, (k,), item=k) for k in range(3)])
    assert ex.grown == 0


def test_ctrl_c_winds_down_then_raises():
    ex = FakeExecutor(2)
    waits = iter(range(100))

    def interrupt(fake: FakeExecutor) -> None:
        if next(waits) == 1:
            raise KeyboardInterrupt

    ex.before_wait = interrupt
    with pytest.raises(KeyboardInterrupt):
        _run(ex, _policy(in_flight=1), [Task(echo, (k,), item=k) for k in range(5)])
    in_flight = list(ex.pending)
    assert len(in_flight) == 2
    assert ex.ended == [("cancel", "run-1"), ("drain", in_flight), ("stop", in_flight)]


def test_ctrl_c_in_on_result_winds_down_too():
    ex = FakeExecutor(2)

    def stop(task: Task, result: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(ex, _policy(in_flight=1), [Task(echo, (k,), item=k) for k in range(3)], stop)
    assert [what for what, _ in ex.ended] == ["cancel", "drain", "stop"]
    assert ex.ended[1][1] == ex.pending  # the other call still in flight


class SignalledAtSubmit(FakeExecutor):
    """Sends ``sig`` to this process from inside its ``nth`` submit, once the call is made:
    the signal lands while the worker already has the call and the dispatcher has not yet
    recorded it (what a real Ctrl-C or ``kill`` can hit)."""

    def __init__(self, n: int, nth: int, sig: int) -> None:
        super().__init__(n)
        self.nth, self.sig = nth, sig

    def submit(self, i: int, fn: Callable[..., Any], *args: Any, group: str = "batch") -> Call:
        call = super().submit(i, fn, *args, group=group)
        if len(self.log) == self.nth:
            os.kill(os.getpid(), self.sig)
        return call


@pytest.fixture
def installed(monkeypatch):
    """Ctrl-C, SIGTERM and SIGHUP handled as the CLI handles them, for this test only."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, *interrupts.SIGNALS)}
    monkeypatch.setattr(interrupts, "_received_at", None)
    monkeypatch.setattr(interrupts, "_installed", False)
    # Ctrl-C as in a terminal: a shell's background job (CI's) starts with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts.install()
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_inside_a_submit_still_waits_for_that_call(installed, sig):
    # Before: the interrupt cut the submit in two and the wind-down stopped the worker
    # without waiting for the call it had just been given (an output left without its
    # ledger record when a sanitize was stopped).
    ex = SignalledAtSubmit(2, nth=2, sig=sig)
    with pytest.raises(KeyboardInterrupt):
        _run(ex, _policy(in_flight=1), [Task(echo, (k,), item=k) for k in range(5)])
    assert len(ex.log) == 2 and ex.pending == ex.log  # both calls handed out, none answered
    assert ex.ended == [("cancel", "run-1"), ("drain", ex.log), ("stop", ex.log)]


def test_held_delivers_the_first_signal_when_the_block_ends(installed):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, *interrupts.SIGNALS)}
    steps = []
    with pytest.raises(interrupts.Terminated) as caught, interrupts.held():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handlers ran by now: held, not raised
        steps.append("block ended")
    assert steps == ["block ended"]
    assert caught.value.signum == signal.SIGTERM  # the first, as it would have been
    assert {s: signal.getsignal(s) for s in before} == before  # handlers put back
    with interrupts.held():
        pass  # nothing came: nothing raised


def test_held_holds_nothing_off_the_main_thread():
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            with interrupts.held():
                out.append(None)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(5)
    assert out == [None]


def test_an_empty_run_returns_at_once():
    ex = FakeExecutor(1)
    assert _run(ex, _policy(), []) == ({}, [])
    assert not ex.log


# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "message"), [
    ({"attempts": 0}, "attempts must be at least 1, got 0"),
    ({"in_flight": 0}, "in_flight must be at least 1, got 0"),
    ({"grow_every_s": 1.0}, "grow_every_s needs plan_node"),
])
def test_policy_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        _policy(**kw)


def test_policy_defaults():
    p = Policy("x", 1.0, "t")
    assert (p.in_flight, p.attempts, p.isolate, p.grow_every_s, p.role) == (1, 1, False,
                                                                            None, None)
    from safelora_ray.execution import WORKER_LOST

    assert p.lost_errors == WORKER_LOST
