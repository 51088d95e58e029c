"""The storage interface: :class:`Storage` (size, ranged read, listing, atomic put) and the
:class:`ObjectInfo` of a listed object.

Backends live in their own modules (``local``, ``s3``, ``hf``); a URI is opened with
:func:`safelora_ray.storage.open_storage` (:mod:`safelora_ray.storage.registry`).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from safelora_ray.core.errors import ChangedError, StorageError
from safelora_ray.storage.uri import join_uri

#: Name prefix of a local staging directory (swept by the next run when left behind).
STAGING_PREFIX = ".staging-"

logger = logging.getLogger(__name__)

#: Largest object :meth:`Storage.read` loads whole into memory unless told otherwise.
DEFAULT_MAX_READ_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object.

    Attributes:
        path: Path relative to the storage root, ``/``-separated.
        size: Size in bytes.
        version: An opaque token that changes when the content changes (S3 ETag, Hub blob id,
            local ``mtime_ns-size``).
    """

    path: str
    size: int
    version: str


class Storage(abc.ABC):
    """A root URI under which objects are read and written by relative path.

    Implementations must be safe to use from several threads at once (the readers issue
    concurrent ranged reads) and picklable (they travel to Ray workers); picklability is
    provided by re-opening from the root: each backend's ``__reduce__`` returns its class and
    root rather than its clients.
    """

    #: The root URI, normalized (no trailing ``/``).
    uri: str
    #: Bytes fetched by reads on this instance (for "read only the targets" accounting).
    bytes_read: int = 0
    #: Every request pays a network round trip (an object store): callers overlap requests
    #: in threads whatever the objects' sizes, and save requests where a listing says enough.
    remote: bool = False
    _count_lock = threading.Lock()

    def _count(self, n: int) -> None:
        with Storage._count_lock:
            self.bytes_read += n

    # -- reading -----------------------------------------------------------------------------
    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Size in bytes of the object at ``path``; :class:`NotFoundError` if absent."""

    @abc.abstractmethod
    def read_range(self, path: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes from offset ``start``; error if the object is shorter."""

    def read_into(self, path: str, start: int, buffer: memoryview, *,
                  if_version: str | None = None) -> None:
        """Fill ``buffer`` with the bytes at ``[start, start + len(buffer))``.

        Backends override this to read without an intermediate copy or with parallel ranges.
        ``if_version``: the object's version as listed (:attr:`ObjectInfo.version`); a
        :class:`ChangedError` when it is no longer that one (an object store checks it on
        every request, so the bytes of one read never mix two versions).
        """
        self._check_version(path, if_version)
        buffer[:] = self.read_range(path, start, len(buffer))

    def read(self, path: str, max_bytes: int = DEFAULT_MAX_READ_BYTES, *,
             if_version: str | None = None) -> bytes:
        """The whole object; refuses objects larger than ``max_bytes``. ``if_version``: as
        for :meth:`read_into`."""
        self._check_version(path, if_version)
        n = self.size(path)
        if n > max_bytes:
            raise StorageError(
                f"{self.describe(path)} is {n} bytes, more than the {max_bytes} allowed here"
            )
        return self.read_range(path, 0, n) if n else b""

    def _check_version(self, path: str, if_version: str | None) -> None:
        """Raise :class:`ChangedError` when ``path`` is no longer version ``if_version``."""
        if if_version is not None and self.version(path) != if_version:
            raise ChangedError(f"{self.describe(path)} changed since it was listed")

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether an object exists at ``path``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` (recursive), lazily, in lexicographic order of path."""

    @abc.abstractmethod
    def version(self, path: str) -> str:
        """The object's version token (see :class:`ObjectInfo`)."""

    # -- writing -----------------------------------------------------------------------------
    def put_bytes(self, path: str, data: bytes | bytearray) -> str | None:
        """Atomically write ``data`` at ``path``: readers see the old object or the new one.

        Returns:
            The new object's version when the write tells it (an object store's ETag, as
            :meth:`list` gives it), else None.
        """
        raise StorageError(f"{self.uri} is read-only")

    def put_bytes_if(self, path: str, data: bytes, *, if_version: str | None) -> bool:
        """Conditional atomic write, for leases and other compare-and-swap records.

        Args:
            path: Object path.
            data: New content.
            if_version: None: write only if no object exists; else write only if the current
                object's :meth:`version` equals this.

        Returns:
            True if written; False if the condition did not hold (someone else won).
        """
        raise StorageError(f"{self.uri} does not support conditional writes")

    def put_file(self, path: str, local_path: str) -> str | None:
        """Atomically upload the local file ``local_path`` to ``path``.

        Returns:
            The written object's :meth:`version` when the write told it (an S3 PUT's ETag),
            else None.
        """
        raise StorageError(f"{self.uri} is read-only")

    @contextlib.contextmanager
    def writing_file(self, path: str) -> Iterator[str]:
        """A local file to write the content of ``path`` into, published atomically when the
        block exits normally (nothing is published when it raises).

        This default writes a temp file and uploads it with :meth:`put_file`; local storage
        writes next to the target and renames it into place, so the bytes are written once.
        """
        fd, tmp = tempfile.mkstemp(prefix="safelora-", suffix=".part")
        os.close(fd)
        try:
            yield tmp
            self.put_file(path, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_tree(self, prefix: str, files: list[tuple[str, str | bytes | bytearray]],
                 move: bool = False, cache: bool = True) -> dict[str, str] | None:
        """Publish a set of files under ``prefix`` as one unit, as far as the backend allows.

        ``files`` are ``(relative path, local file or bytes)`` pairs, in the order to publish
        them; the last one is the marker that makes the tree visible (``adapter_config.json``).
        Backends with directories (local) stage the tree and rename it into place; object
        stores upload each object atomically and the marker last. ``move``: the local files
        are the caller's to give away (a backend may move them rather than copy them).
        ``cache=False``: nothing will read the tree back soon (a fleet's outputs), so a
        backend with a page cache drops its pages once they are durable.

        Returns:
            ``{relative path: version}`` of the objects written, when every write told its
            version (an object store's PUT answers with the ETag: no listing needed to learn
            it); else None.
        """
        versions: dict[str, str] = {}
        for rel, local in files:
            path = posixpath.join(prefix, rel)
            v = (self.put_bytes(path, local) if isinstance(local, (bytes, bytearray))
                 else self.put_file(path, local))
            if v is not None:
                versions[rel] = v
        return versions if len(versions) == len(files) else None

    def scratch_dir(self) -> str | None:
        """A local directory where files meant for :meth:`put_tree` are best written (for a
        local root: on its own filesystem, so that they are moved into place, not copied);
        None for the system's temp dir. Anything left there by a killed writer is removed by
        the next run (its name starts with :data:`STAGING_PREFIX`)."""
        return None

    def delete(self, path: str) -> None:
        """Delete the object at ``path`` if it exists."""
        raise StorageError(f"{self.uri} is read-only")

    # -- misc ----------------------------------------------------------------------------------
    def describe(self, path: str) -> str:
        """A human-readable URI for ``path`` (used in error messages; never contains secrets)."""
        return join_uri(self.uri, path)

    def local_path(self, path: str) -> str | None:
        """A local filesystem path holding the object's bytes, when there is one."""
        return None
