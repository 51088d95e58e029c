"""A map filled once per key, shared by threads (a worker's storages, a holder's matrices)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class OnceMap(Generic[K, V]):
    """``get(key, make)`` makes a key's value once, under a lock, however many threads ask
    at once; a value already there is read without the lock (the hot path)."""

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        self._items: dict[K, V] = dict(items)
        self._lock = threading.Lock()

    def get(self, key: K, make: Callable[[], V]) -> V:
        value = self._items.get(key)
        if value is None:
            with self._lock:
                value = self._items.get(key)
                if value is None:
                    value = self._items[key] = make()
        return value

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))


__all__ = ["OnceMap"]
