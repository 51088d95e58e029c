"""URI → backend: :func:`open_storage` picks the storage class for a location.

Kept apart from :mod:`safelora_ray.storage.base` (the interface every backend imports), so
the backends and the interface do not import each other. A backend's module is imported when
a URI of its scheme is first opened.
"""

from __future__ import annotations

import logging
import os

from safelora_ray.core.errors import StorageError
from safelora_ray.storage.base import Storage
from safelora_ray.storage.uri import check_uri, split_uri

logger = logging.getLogger(__name__)


def open_storage(uri: str) -> Storage:
    """Open the storage rooted at ``uri``.

    Args:
        uri: A local path, ``file:///abs/path``, ``s3://bucket[/prefix]`` or
            ``hf://org/name[@revision]`` (optionally followed by ``/subdir``).

    Returns:
        A :class:`Storage` rooted there.
    """
    scheme, rest = split_uri(check_uri(str(uri)))
    if scheme == "file":
        from safelora_ray.storage.local import LocalStorage

        return LocalStorage(os.path.abspath(os.path.expanduser(rest)))
    if scheme == "s3":
        from safelora_ray.storage.s3 import S3Storage

        return S3Storage(rest)
    if scheme == "hf":
        from safelora_ray.storage.hf import HfStorage

        return HfStorage(rest)
    raise StorageError(f"unsupported URI scheme {scheme!r} in {uri!r} (use a path, s3:// or hf://)")
