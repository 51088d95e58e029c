"""What a task function runs against on a worker: its :class:`WorkerContext` (device, node,
state kept between calls in named slots), held by a :class:`WorkerCore`.

Plain Python, no Ray: the same core runs in a worker actor
(:class:`~safelora_ray.execution.actor.SafeLoraWorker`) and in this process
(:class:`~safelora_ray.execution.inline.InlineExecutor`).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Concurrency groups of a worker, and threads each: ``stream`` runs one call at a time (a
#: build shard's files are read in order by one prefetch thread); ``batch`` runs two (one
#: batch reads and writes, I/O releasing the GIL, while the other computes); ``io`` runs up to
#: three, for batches that mostly wait on I/O (a sanitize's: two in flight, three on an object
#: store, whose requests wait on round trips); ``serve`` answers
#: the I/O workers of its node (a holder's products: requests wait there to be coalesced).
GROUPS = {"stream": 1, "batch": 2, "io": 3, "serve": 64}
#: Cancellation and health checks reach a worker through their own group, never queued
#: behind the work.
CONTROL_GROUP = "control"


class WorkerContext:
    """What a task function sees of the worker it runs on: the device it computes on, its
    node, and state kept between calls.

    State lives in named *slots*, one object per slot: asking a slot for another key drops the
    object it held (calling its ``close()`` if it has one) before the factory makes the new
    one, so a 70B alignment set is never resident twice. Thread-safe; each slot has its own
    lock, so a slow factory (loading a set) does not hold up the other slots.

    Args:
        device: ``cpu`` or ``cuda``.
        node_id: The Ray node this worker runs on (None in this process).
    """

    def __init__(self, device: str, node_id: str | None = None) -> None:
        self.device = device
        self.node_id = node_id
        self._cancelled: set[str] = set()
        self._slots: dict[str, tuple[Hashable, Any]] = {}
        self._locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(
            threading.Lock)
        self._lock = threading.Lock()

    def _slot_lock(self, slot: str) -> threading.Lock:
        with self._lock:
            return self._locks[slot]

    def resident(self, slot: str, key: Hashable, factory: Callable[[], T]) -> T:
        """The object held in ``slot`` for ``key``, made by ``factory`` when the slot holds
        nothing or another key's object (which is dropped first)."""
        with self._slot_lock(slot):
            held = self._slots.get(slot)
            if held is not None and held[0] == key:
                return held[1]
            if held is not None:
                self._slots.pop(slot)
                _close(held[1])
            obj = factory()
            self._slots[slot] = (key, obj)
            return obj

    def cancel(self, token: str) -> None:
        """Ask the tasks of run ``token`` to stop at their next safe point (after the adapter
        or module in progress): an interrupted run leaves nothing half-written."""
        self._cancelled.add(token)

    def cancelled(self, token: str) -> bool:
        """Whether run ``token`` was cancelled (tasks poll this between units of work)."""
        return token in self._cancelled

    def peek(self, slot: str) -> tuple[Hashable, Any] | None:
        """``(key, object)`` held in ``slot``, or None."""
        return self._slots.get(slot)

    def slots(self) -> list[str]:
        """The names of the slots holding something."""
        return list(self._slots)

    def drop(self, slot: str, key: Hashable | None = None) -> None:
        """Drop (and close) what ``slot`` holds; only if it is ``key``'s when given."""
        with self._slot_lock(slot):
            held = self._slots.get(slot)
            if held is not None and (key is None or held[0] == key):
                self._slots.pop(slot)
                _close(held[1])

    def close(self) -> None:
        """Drop every slot."""
        for slot in list(self._slots):
            self.drop(slot)


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        try:
            close()
        except Exception as e:  # housekeeping: never fail the call that replaced it
            logger.warning("closing %s failed: %s", type(obj).__name__, e)


class WorkerCore:
    """One worker's state between calls (plain Python; the worker actor wraps it): a
    :class:`WorkerContext` that task functions run against.

    Args:
        device: ``cpu`` or ``cuda``.
        node_id: The node it runs on.
    """

    def __init__(self, device: str, node_id: str | None = None) -> None:
        self.device = device
        self.context = WorkerContext(device, node_id)

    def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(context, *args)`` here."""
        return fn(self.context, *args)


__all__ = ["CONTROL_GROUP", "GROUPS", "WorkerContext", "WorkerCore"]
