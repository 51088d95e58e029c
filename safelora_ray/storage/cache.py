"""One storage per URI for a long-lived reader (a worker's builder, sanitizer or projector)."""

from __future__ import annotations

import threading

from safelora_ray.storage.base import Storage
from safelora_ray.storage.registry import open_storage


class StorageCache:
    """Opens each URI's storage once and keeps it (its connection pool, its read counter).
    Thread-safe: a reader's threads share it."""

    def __init__(self) -> None:
        self._storages: dict[str, Storage] = {}
        self._lock = threading.Lock()

    def get(self, uri: str) -> Storage:
        st = self._storages.get(uri)
        if st is None:
            with self._lock:
                st = self._storages.get(uri)
                if st is None:
                    st = self._storages[uri] = open_storage(uri)
        return st

    @property
    def bytes_read(self) -> int:
        """Bytes read through every storage opened so far (their own counters)."""
        with self._lock:
            return sum(s.bytes_read for s in self._storages.values())


__all__ = ["StorageCache"]
