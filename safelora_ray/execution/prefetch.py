"""Read-ahead: a generator whose steps do the reads, run in a thread a bounded way ahead."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


def read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run the generator ``items`` (whose steps do the reads) in a thread, at most ``depth``
    items ahead of the consumer; its exceptions are raised to the consumer. Closing the
    consumer's iterator stops the thread."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():  # a consumer that stopped takes nothing more: give up
            try:
                q.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # surfaced to the consumer
            put(("error", e))

    threading.Thread(target=run, name="safelora-read-ahead", daemon=True).start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


__all__ = ["read_ahead"]
