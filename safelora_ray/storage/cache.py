"""One storage per URI for a long-lived reader (a worker's builder, sanitizer or projector)."""

from __future__ import annotations

from safelora_ray.core.once import OnceMap
from safelora_ray.storage.base import Storage
from safelora_ray.storage.registry import open_storage


class StorageCache:
    """Opens each URI's storage once and keeps it (its connection pool, its read counter).
    Thread-safe: a reader's threads share it."""

    def __init__(self) -> None:
        self._storages: OnceMap[str, Storage] = OnceMap()

    def get(self, uri: str) -> Storage:
        return self._storages.get(uri, lambda: open_storage(uri))

    @property
    def bytes_read(self) -> int:
        """Bytes read through every storage opened so far (their own counters)."""
        return sum(s.bytes_read for s in self._storages.values())


__all__ = ["StorageCache"]
