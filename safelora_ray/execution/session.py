"""Worker sessions: actors shared by the calls made inside one (:func:`worker_session`).

A nightly run builds and then sanitizes several catalogs on the same warm workers, with the
alignment set already resident; outside a session each call starts its own actors and stops
them when it returns, so no cluster resource stays held.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from safelora_ray.execution.actor import _actor_key, _kill, _start_actor
from safelora_ray.execution.placement import WorkerSpec

logger = logging.getLogger(__name__)


class WorkerSession:
    """Worker actors kept between calls, each for its resources (node, CPUs, GPU share): a
    call reuses the matching actors and stops the others, so they never hold what the new
    ones need."""

    def __init__(self) -> None:
        self._actors: list[tuple[tuple[Any, ...], Any]] = []
        self._lock = threading.Lock()

    def acquire(self, specs: Sequence[WorkerSpec], runtime_env: dict[str, Any]) -> list[Any]:
        """One actor per spec, reusing the running ones that match."""
        with self._lock:
            spare = list(self._actors)
            kept: list[tuple[tuple[Any, ...], Any]] = []
            for spec in specs:
                key = _actor_key(spec, runtime_env)
                match = next((x for x in spare if x[0] == key), None)
                if match is not None:
                    spare.remove(match)
                    kept.append(match)
                else:
                    kept.append((key, _start_actor(spec, runtime_env)))
            for _, handle in spare:  # not needed by this call: free what they hold
                _kill(handle)
            self._actors = kept
            return [handle for _, handle in kept]

    def add(self, specs: Sequence[WorkerSpec], runtime_env: dict[str, Any]) -> list[Any]:
        """New actors for ``specs`` beside the running ones (replacements, new nodes)."""
        with self._lock:
            new = [(_actor_key(spec, runtime_env), _start_actor(spec, runtime_env))
                   for spec in specs]
            self._actors.extend(new)
        return [handle for _, handle in new]

    def forget(self, handle: Any) -> None:
        """Stop ``handle`` (a dropped worker) and never hand it out again."""
        with self._lock:
            self._actors = [x for x in self._actors if x[1] != handle]
        _kill(handle)

    def shutdown(self) -> None:
        """Stop every worker of the session."""
        with self._lock:
            actors, self._actors = self._actors, []
        if ray.is_initialized():
            for _, handle in actors:
                _kill(handle)


_session: WorkerSession | None = None
_session_lock = threading.Lock()


def active_session() -> WorkerSession | None:
    """The session of the enclosing :func:`worker_session` block, if any."""
    return _session


@contextlib.contextmanager
def worker_session() -> Iterator[WorkerSession]:
    """Share worker actors between the build and sanitize calls made inside the block.

    Workers start once (importing torch takes seconds) and keep the alignment set they last
    used resident (on the GPU when they have one); they are stopped when the block exits.
    Nested blocks share the outer session.

    Example::

        with worker_session():
            build(BuildConfig(...))
            sanitize(SanitizeConfig(...))
    """
    global _session
    with _session_lock:
        outer = _session
        if outer is None:
            _session = WorkerSession()
        session = _session
    assert session is not None
    try:
        yield session
    finally:
        if outer is None:
            with _session_lock:
                _session = None
            session.shutdown()


__all__ = ["WorkerSession", "active_session", "worker_session"]
