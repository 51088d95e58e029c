"""Local file primitives shared by the backends that read files on this machine (local roots,
the Hub cache): ranged reads on a file descriptor straight into a buffer, and a sorted,
lazily listed walk of a directory tree through directory descriptors.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from safelora_ray.core.errors import StorageError
from safelora_ray.storage.base import STAGING_PREFIX

logger = logging.getLogger(__name__)

#: Names of in-flight or discarded write artifacts; never listed as objects.
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_HIDDEN_PREFIXES = (TMP_PREFIX, STAGING_PREFIX, TRASH_PREFIX)


def as_byte_view(buffer: memoryview) -> memoryview:
    """``buffer`` as a flat, writable view of unsigned bytes.

    Args:
        buffer: A writable, C-contiguous memoryview of any format and shape.

    Returns:
        A 1-D ``"B"`` view over the same memory.

    Raises:
        StorageError: If the buffer is read-only or not contiguous.
    """
    if buffer.readonly:
        raise StorageError("read_into needs a writable buffer")
    if buffer.format == "B" and buffer.ndim == 1:
        return buffer
    if not buffer.c_contiguous:
        raise StorageError("read_into needs a C-contiguous buffer")
    return buffer.cast("B")


def check_range(start: int, length: int) -> None:
    """Reject negative offsets and lengths before they reach a syscall or a Range header."""
    if start < 0 or length < 0:
        raise StorageError(f"invalid byte range: start={start}, length={length}")


def pread_into(fd: int, buffer: memoryview, start: int, what: str, file_size: int) -> None:
    """Fill ``buffer`` from ``fd`` at offset ``start``, looping over short reads.

    Args:
        fd: An open file descriptor.
        buffer: A flat writable byte view.
        start: File offset of ``buffer[0]``.
        what: Name of the file for error messages.
        file_size: The file's size, for error messages.

    Raises:
        StorageError: If the file ends before the buffer is full.
    """
    n = len(buffer)
    done = 0
    while done < n:
        # preadv may return less than asked (Linux caps one call near 2 GiB, signals, ...).
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [buffer[done:]], start + done)
        else:  # pragma: no cover - non-Linux/BSD fallback
            chunk = os.pread(fd, n - done, start + done)
            got = len(chunk)
            buffer[done : done + got] = chunk
        if got == 0:
            raise StorageError(
                f"short read from {what}: wanted bytes [{start}, {start + n}) but the file has "
                f"{file_size} bytes"
            )
        done += got


def read_range_fd(fd: int, start: int, length: int, what: str) -> bytes:
    """Exactly ``length`` bytes at ``start`` from ``fd`` (``os.pread`` based).

    Raises:
        StorageError: If the file is shorter than ``start + length``.
    """
    size = os.fstat(fd).st_size
    if start + length > size:
        raise StorageError(
            f"byte range [{start}, {start + length}) is past the end of {what} ({size} bytes)"
        )
    if length == 0:
        return b""
    data = os.pread(fd, length, start)
    if len(data) == length:
        return data
    # Rare: a short pread (huge length, or the file shrank); finish into a buffer.
    buf = bytearray(length)
    buf[: len(data)] = data
    pread_into(fd, memoryview(buf)[len(data) :], start + len(data), what, size)
    return bytes(buf)


def read_into_fd(fd: int, start: int, buffer: memoryview, what: str) -> None:
    """Fill ``buffer`` from ``fd`` at ``start`` without an intermediate copy.

    Raises:
        StorageError: If the file is shorter than ``start + len(buffer)``.
    """
    view = as_byte_view(buffer)
    size = os.fstat(fd).st_size
    if start + len(view) > size:
        raise StorageError(
            f"byte range [{start}, {start + len(view)}) is past the end of {what} ({size} bytes)"
        )
    pread_into(fd, view, start, what, size)


@dataclass(frozen=True)
class FileIdentity:
    """Which file, in which state: a file replaced (renamed over) or rewritten since has
    another identity."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def map_readonly(path: str) -> tuple[mmap.mmap, FileIdentity]:
    """``path`` mapped whole, read-only and shared: its pages are the page cache's, one copy
    however many processes map it. Writes to the file after this show through the mapping,
    and truncating it makes reading past the new end fatal (SIGBUS): map only files that are
    replaced by rename, never rewritten, and compare :class:`FileIdentity` before trusting a
    mapping another process checked.

    Raises:
        StorageError: The file cannot be opened or mapped (missing, empty, not a file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise StorageError(f"cannot open {path} to map it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise StorageError(f"cannot map {path}: not a regular, non-empty file")
        try:
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise StorageError(f"cannot map {path}: {e}") from None
    finally:
        os.close(fd)
    return mapping, FileIdentity.of(st)


@dataclass(frozen=True)
class WalkEntry:
    """One file found by :func:`walk_sorted`.

    Attributes:
        rel: Path relative to the walk's root (prefixed by its ``rel`` argument).
        path: Filesystem path (for messages and realpath checks).
        stat: ``stat`` of the file (symlinks followed), taken through the directory fd.
        link: The symlink target when the entry is a symlink, else ``None``.
    """

    rel: str
    path: str
    stat: os.stat_result
    link: str | None


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


#: Called as ``on_denied(rel, is_dir, error)`` for an entry the walk may not open or stat.
Denied = Callable[[str, bool, OSError], None]


def walk_sorted(top: str, rel: str = "", follow: bool = False,
                links: bool = False, on_denied: Denied | None = None) -> Iterator[WalkEntry]:
    """Regular files under ``top``, lazily, in lexicographic order of their ``/``-joined path.

    Sorting each directory's entries with directories keyed as ``name + "/"`` yields exactly
    the order of the full paths, so no global sort (and no full materialization) is needed.
    The walk descends through directory file descriptors rather than paths: if a directory is
    renamed or replaced mid-walk (``put_tree``), the listing stays within the tree it started
    in instead of mixing files of two generations.

    Args:
        top: Directory to walk; a missing path or a non-directory yields nothing.
        rel: Relative path of ``top`` (prefix of the yielded ``rel`` paths).
        follow: Whether to descend into symlinked directories (no loop protection; only for
            trees we trust, like Hub snapshots). Symlinked files are always followed.
        links: Also yield symlinks whose target is not a regular file (a directory that is
            not descended into), so that callers can report them instead of losing them.
        on_denied: Called for each directory that cannot be opened or listed and each file
            that cannot be stat'ed for lack of permission (``EACCES``/``EPERM``), which the
            walk then passes over; without it they are passed over silently. Entries that
            vanish mid-walk are never reported (a concurrent delete is not an error).
    """
    try:
        fd = os.open(top, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return
    yield from _walk_fd(fd, top, rel, follow, links, on_denied)


def _denied(on_denied: Denied | None, rel: str, is_dir: bool, exc: OSError) -> None:
    """Report a permission error to ``on_denied``; other OS errors are races: passed over."""
    if on_denied is not None and exc.errno in (errno.EACCES, errno.EPERM):
        on_denied(rel, is_dir, exc)


def _walk_fd(fd: int, path: str, rel: str, follow: bool, links: bool,
             on_denied: Denied | None) -> Iterator[WalkEntry]:
    """Walk the directory open as ``fd`` (closed when done or when the generator is dropped)."""
    try:
        try:
            with os.scandir(fd) as it:  # scandir dups the fd; ours stays open for openat/fstatat
                entries = list(it)
        except PermissionError as exc:  # opened, yet listing it is refused (an LSM, ...)
            _denied(on_denied, rel, True, exc)
            return
        keyed = []
        for e in entries:
            if e.name.startswith(_HIDDEN_PREFIXES):
                continue
            try:
                is_dir = e.is_dir(follow_symlinks=follow)
            except OSError as exc:
                _denied(on_denied, f"{rel}/{e.name}" if rel else e.name, False, exc)
                continue
            keyed.append((e.name + "/" if is_dir else e.name, is_dir, e))
        keyed.sort(key=lambda t: t[0])
        for _, is_dir, e in keyed:
            child_rel = f"{rel}/{e.name}" if rel else e.name
            child_path = os.path.join(path, e.name)
            if is_dir:
                flags = _DIR_FLAGS if follow else _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0)
                try:
                    child_fd = os.open(e.name, flags, dir_fd=fd)
                except OSError as exc:  # removed (or replaced by a non-directory) since
                    _denied(on_denied, child_rel, True, exc)  # scandir, or not ours to read
                    continue
                yield from _walk_fd(child_fd, child_path, child_rel, follow, links, on_denied)
                continue
            try:
                link = os.readlink(e.name, dir_fd=fd) if e.is_symlink() else None
                st = os.stat(e.name, dir_fd=fd)  # follows symlinks to files
            except OSError as exc:  # vanished since scandir (concurrent delete/replace),
                _denied(on_denied, child_rel, False, exc)  # dangling, or not searchable
                continue
            if stat.S_ISREG(st.st_mode) or (links and link is not None):
                yield WalkEntry(child_rel, child_path, st, link)
    finally:
        os.close(fd)
