"""Storage by URI: local paths / ``file://``, ``s3://bucket/prefix`` and ``hf://org/name[@rev]``.

Every backend exposes the same small interface (:class:`~safelora_ray.storage.base.Storage`):
size, ranged read, listing, and atomic put. Paths passed to a storage are relative to its
root URI and always use ``/``.
"""

from safelora_ray.storage.base import Storage
from safelora_ray.storage.registry import open_storage
from safelora_ray.storage.uri import join_uri, split_uri

__all__ = ["Storage", "join_uri", "open_storage", "split_uri"]
