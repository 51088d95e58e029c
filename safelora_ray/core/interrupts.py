"""SIGTERM and SIGHUP end a run the way Ctrl-C does.

``ray job stop``, a Kubernetes pod's deletion and a closed terminal send SIGTERM or SIGHUP.
The handlers installed here raise :class:`Terminated` (a ``KeyboardInterrupt``) in the main
thread, so the one interrupt path every pipeline has already runs: work in flight is cancelled
at a safe point, nothing partial is left, leases are given back, and the command exits with
128 + the signal's number (143 for SIGTERM, 129 for SIGHUP). The wind-down then waits at most
``SAFELORA_TERM_GRACE_S`` (default 20 s) for the work in flight, inside Kubernetes' default
30 s grace period.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from safelora_ray.core.validate import env_number

logger = logging.getLogger(__name__)

#: The signals handled like Ctrl-C.
SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: Seconds a terminated run gives the work in flight before it stops its workers.
TERM_GRACE_S = env_number("SAFELORA_TERM_GRACE_S", 20)
#: Exit code of a run interrupted with Ctrl-C.
EXIT_INTERRUPTED = 130


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP (handled as Ctrl-C is)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_installed = False
_received_at: float | None = None


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received_at
    if _received_at is None:
        _received_at = time.monotonic()
    raise Terminated(signum)


def install() -> None:
    """Handle SIGTERM and SIGHUP as Ctrl-C from now on (only the main thread can)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handler)
    _installed = True


def reclaim() -> None:
    """Install the handlers again after ``ray.init``, which sets its own SIGTERM handler (a
    driver that starts a local Ray would otherwise exit at once, leaving everything behind)."""
    if _installed and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            if signal.getsignal(s) is not _handler:
                signal.signal(s, _handler)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block ends, then deliver the first that came.

    For a step that must not be cut in two: a call handed to a worker is recorded as in
    flight before an interrupt can land (else the wind-down would not wait for it, and the
    worker would be stopped mid-write). Only the main thread receives signals; elsewhere
    this holds nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    # None: a handler not set from Python, which cannot be put back: left alone.
    saved = {s: h for s in (signal.SIGINT, *SIGNALS) if (h := signal.getsignal(s)) is not None}
    for s in saved:
        signal.signal(s, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if came:
            signal.raise_signal(came[0])  # now handled as it would have been


def grace_left(grace_s: float) -> float:
    """``grace_s``, or less once a signal came: what is left of :data:`TERM_GRACE_S`."""
    if _received_at is None:
        return grace_s
    return max(0.0, min(grace_s, TERM_GRACE_S - (time.monotonic() - _received_at)))


def exit_code(interrupt: BaseException) -> int:
    """128 + the signal's number for a signal, 130 for Ctrl-C."""
    return 128 + interrupt.signum if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def describe(interrupt: BaseException) -> str:
    """``terminated (SIGTERM)`` or ``interrupted``."""
    return f"terminated ({interrupt})" if isinstance(interrupt, Terminated) else "interrupted"
