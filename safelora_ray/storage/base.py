"""The storage interface and URI dispatch."""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import posixpath
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from safelora_ray.core.errors import ConfigError, StorageError

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
    provided by re-opening from :attr:`uri`.
    """

    #: The root URI, normalized (no trailing ``/``).
    uri: str
    #: Bytes fetched by reads on this instance (for "read only the targets" accounting).
    bytes_read: int = 0
    _count_lock = threading.Lock()

    def _count(self, n: int) -> None:
        with Storage._count_lock:
            self.bytes_read += n

    def __reduce__(self):  # re-open on the other side instead of pickling clients
        return (open_storage, (self.uri,))

    # -- reading -----------------------------------------------------------------------------
    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Size in bytes of the object at ``path``; :class:`NotFoundError` if absent."""

    @abc.abstractmethod
    def read_range(self, path: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes from offset ``start``; error if the object is shorter."""

    def read_into(self, path: str, start: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``[start, start + len(buffer))``.

        Backends override this to read without an intermediate copy or with parallel ranges.
        """
        buffer[:] = self.read_range(path, start, len(buffer))

    def read(self, path: str, max_bytes: int = DEFAULT_MAX_READ_BYTES) -> bytes:
        """The whole object; refuses objects larger than ``max_bytes``."""
        n = self.size(path)
        if n > max_bytes:
            raise StorageError(
                f"{self.describe(path)} is {n} bytes, more than the {max_bytes} allowed here"
            )
        return self.read_range(path, 0, n) if n else b""

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
    def put_bytes(self, path: str, data: bytes) -> None:
        """Atomically write ``data`` at ``path``: readers see the old object or the new one."""
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

    def put_file(self, path: str, local_path: str) -> None:
        """Atomically upload the local file ``local_path`` to ``path``."""
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

    def put_tree(self, prefix: str, files: list[tuple[str, str]], move: bool = False) -> None:
        """Publish a set of files under ``prefix`` as one unit, as far as the backend allows.

        ``files`` are ``(relative path, local file)`` pairs, in the order to publish them; the
        last one is the marker that makes the tree visible (e.g. ``adapter_config.json``).
        Backends with directories (local) stage the tree and rename it into place; object
        stores upload each object atomically and the marker last. ``move``: the local files
        are the caller's to give away (a backend may move them rather than copy them).
        """
        for rel, local in files:
            self.put_file(posixpath.join(prefix, rel), local)

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


#: URI schemes this tool reads or writes.
SCHEMES = ("file", "s3", "hf")
_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$", re.S)


def check_uri(uri: str, what: str = "URI") -> str:
    """Refuse a location that looks like a URI but is not a valid one; returns ``uri``.

    ``s3:/bucket/x`` or ``s3:bucket/x`` would otherwise be read as a *local* folder named
    ``s3:`` (a catalog that "does not exist", or a run written to ``./s3:/``), so anything
    that starts like a scheme must be a well-formed URI of a known scheme.

    Args:
        uri: A local path or ``scheme://...`` URI.
        what: How to name it in the message (a flag, e.g. ``--out``).

    Raises:
        ConfigError: naming ``what``, the value and, when it is a near-miss, the fix.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"{what} is empty")
    if uri != uri.strip():
        raise ConfigError(f"{what} {uri!r} has leading or trailing spaces")
    m = _SCHEME_PREFIX.match(uri)
    if m is None:
        return uri  # a plain path
    scheme, slashes, rest = m.group(1).lower(), m.group(2), m.group(3)
    if scheme == "file" and slashes == "///":
        return uri  # file:///abs/path
    if slashes == "//" and scheme in SCHEMES:
        if scheme == "file":
            raise ConfigError(f"{what} {uri!r} is not a valid file URI: did you mean "
                              f"'file:///{rest}'?")
        if not rest.strip("/"):
            raise ConfigError(f"{what} {uri!r} names no {'bucket' if scheme == 's3' else 'repo'}")
        return uri
    if scheme in SCHEMES:
        fixed = f"{scheme}:///{rest}" if scheme == "file" else f"{scheme}://{rest}"
        raise ConfigError(f"{what} {uri!r} is not a valid URI: did you mean {fixed!r}?")
    if slashes == "//":
        raise ConfigError(f"{what} {uri!r}: unsupported URI scheme {scheme!r} "
                          "(use a local path, s3:// or hf://)")
    raise ConfigError(f"{what} {uri!r} looks like a URI with scheme {scheme!r}, which is not "
                      "supported (use a local path, s3:// or hf://); if it is a local path, "
                      f"write it as ./{uri}")


def location(uri: str) -> tuple[str, str]:
    """Where ``uri`` points, comparably: ``(namespace, path)``.

    Local paths resolve symlinks (two spellings of one directory are one place); S3 is the
    bucket and the key prefix; the Hub is the repo at its revision and a subfolder.
    """
    scheme, rest = split_uri(check_uri(uri))
    if scheme == "file":
        return "file", os.path.realpath(os.path.abspath(os.path.expanduser(rest)))
    bucket_or_repo, _, path = rest.strip("/").partition("/")
    if scheme == "hf":  # org/name[@rev]/subdir
        org, _, after = rest.strip("/").partition("/")
        name, _, path = after.partition("/")
        bucket_or_repo = f"{org}/{name if '@' in name else name + '@main'}"
    return f"{scheme}:{bucket_or_repo}", "/".join(p for p in path.split("/") if p)


def overlap(a: str, b: str) -> str | None:
    """How location ``a`` relates to ``b``: ``"same"``, ``"inside"`` (a lies in b),
    ``"contains"`` (b lies in a), or None when they are apart."""
    (na, pa), (nb, pb) = location(a), location(b)
    if na != nb:
        return None
    sep = os.sep if na == "file" else "/"
    if pa == pb:
        return "same"
    if not pb or pa.startswith(pb.rstrip(sep) + sep):
        return "inside"
    if not pa or pb.startswith(pa.rstrip(sep) + sep):
        return "contains"
    return None


def refuse_overlap(out: str, out_flag: str, other: str, other_flag: str, why: str) -> None:
    """Raise a :class:`ConfigError` when the output location ``out`` equals, contains or lies
    inside the input ``other`` (inputs are never written, and outputs never become inputs).

    Args:
        out: The output URI.
        out_flag: Its flag, for the message (``--out``).
        other: An input URI.
        other_flag: Its flag (``--adapters``).
        why: What would go wrong, for the message.
    """
    rel = overlap(out, other)
    if rel is None:
        return
    how = {"same": "is the same place as", "inside": "lies inside",
           "contains": "contains"}[rel]
    raise ConfigError(f"{out_flag} {out} {how} {other_flag} {other}: {why}; choose an "
                      f"{out_flag} apart from it")


def split_uri(uri: str) -> tuple[str, str]:
    """Split ``uri`` into ``(scheme, rest)``; plain paths have scheme ``file``."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme.lower(), rest
    return "file", uri


def join_uri(uri: str, path: str) -> str:
    """``uri`` joined with a relative ``path`` using ``/``."""
    if not path:
        return uri
    return uri.rstrip("/") + "/" + path.lstrip("/")


def normalize_relpath(path: str) -> str:
    """Validate a relative object path: no absolute paths, no ``..``, no empty segments."""
    if path in ("", "."):
        return ""
    p = path.replace("\\", "/")
    if p.startswith("/") or any(seg in ("..", "") for seg in p.split("/")):
        raise StorageError(f"invalid relative path {path!r}")
    return p


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
