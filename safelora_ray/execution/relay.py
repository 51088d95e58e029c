"""A worker call's log records, sent back with its result and emitted on the driver.

The driver prints them in order, once, and never after its final summary (Ray's own log
forwarding is asynchronous and prints every line with a prefix).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: Log records relayed per call at most (a task that logs in a loop must not flood the driver).
MAX_RELAYED = 200


class _Relay(logging.Handler):
    """Collects the ``safelora_ray`` log records a call emits, to send them back with its
    result.

    Records of the call's own thread go with its result. Records of threads that belong to
    no call (the helper threads a call starts: a build's reader and writer, the S3 range
    reads, a holder's projection thread) go with the next result this worker sends, so that
    they reach the driver too instead of the worker's log file only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._others: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        item = (record.name, record.levelno, record.getMessage())
        buf = getattr(self._local, "records", None)
        if buf is None:
            with self._lock:
                if len(self._others) < MAX_RELAYED:
                    self._others.append(item)
        elif len(buf) < MAX_RELAYED:
            buf.append(item)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[str, int, str]]]:
        self._local.records = records = []
        try:
            yield records
        finally:
            self._local.records = None
            with self._lock:
                others, self._others = self._others, []
            records.extend(others[:max(0, MAX_RELAYED - len(records))])


@dataclass(frozen=True)
class Relayed:
    """A worker call's result and the log records it emitted."""

    result: Any
    records: list[tuple[str, int, str]]


def relay(records: Sequence[tuple[str, int, str]]) -> None:
    """Emit a worker's log records here, under their own logger names."""
    for name, level, message in records:
        logging.getLogger(name).log(level, "%s", message)


__all__ = ["MAX_RELAYED", "Relayed", "relay"]
