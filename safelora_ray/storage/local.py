"""Local filesystem storage (plain paths and ``file://`` URIs)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from safelora_ray.core.errors import NotFoundError, StorageError
from safelora_ray.storage.base import STAGING_PREFIX, ObjectInfo, Storage, normalize_relpath

logger = logging.getLogger(__name__)

#: Names of in-flight or discarded write artifacts; never listed as objects.
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_HIDDEN_PREFIXES = (TMP_PREFIX, STAGING_PREFIX, TRASH_PREFIX)

_COPY_CHUNK = 8 * 1024 * 1024


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


class LocalStorage(Storage):
    """Objects are files under a root directory.

    Writes are atomic: a temporary file in the destination directory is fsynced and then
    renamed over the target, and :meth:`put_tree` renames a fully staged directory into place.

    Args:
        root: Absolute directory path; it need not exist until the first write.
    """

    def __init__(self, root: str) -> None:
        root = os.fspath(root)
        if not os.path.isabs(root):
            raise StorageError(f"local storage root must be an absolute path, got {root!r}")
        self.root = os.path.normpath(root)
        self.uri = self.root

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    # -- paths -------------------------------------------------------------------------------
    def describe(self, path: str) -> str:
        """The full filesystem path of ``path`` (for messages; not validated)."""
        return os.path.join(self.root, path) if path else self.root

    def _resolve(self, path: str, *, allow_root: bool = False) -> str:
        """Absolute path of ``path``, refusing anything that leaves the root.

        Raises:
            StorageError: For ``..``, absolute paths, or symlinks that resolve outside the root.
        """
        rel = normalize_relpath(path)
        if not rel and not allow_root:
            raise StorageError(f"empty object path under {self.root}")
        full = os.path.join(self.root, rel) if rel else self.root
        # realpath catches symlinks (in the root or below) that point outside the root.
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(full)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise StorageError(
                f"path {path!r} resolves to {real}, outside the storage root {self.root}"
            )
        return full

    def local_path(self, path: str) -> str:
        """The real (symlink-resolved) filesystem path of ``path``."""
        return os.path.realpath(self._resolve(path))

    def _open_read(self, path: str) -> tuple[int, str]:
        full = self._resolve(path)
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise NotFoundError(f"file not found: {full}") from None
        except IsADirectoryError:
            raise NotFoundError(f"{full} is a directory, not a file") from None
        except NotADirectoryError:
            raise NotFoundError(f"file not found: {full}") from None
        except PermissionError as exc:
            raise StorageError(f"permission denied reading {full}") from exc
        # Linux opens directories read-only without complaint; reads would then fail with EISDIR.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFoundError(f"{full} is not a regular file")
        return fd, full

    def _stat(self, path: str) -> os.stat_result:
        full = self._resolve(path)
        try:
            st = os.stat(full)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"file not found: {full}") from None
        except PermissionError as exc:
            raise StorageError(f"permission denied on {full}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"{full} is not a regular file")
        return st

    # -- reading -----------------------------------------------------------------------------
    def size(self, path: str) -> int:
        """Size of the file at ``path`` in bytes."""
        return self._stat(path).st_size

    def read_range(self, path: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes from offset ``start``."""
        check_range(start, length)
        fd, full = self._open_read(path)
        try:
            data = read_range_fd(fd, start, length, full)
        finally:
            os.close(fd)
        self._count(len(data))
        return data

    def read_into(self, path: str, start: int, buffer: memoryview) -> None:
        """Read straight into ``buffer`` with ``preadv`` (no intermediate bytes object)."""
        check_range(start, len(buffer))
        fd, full = self._open_read(path)
        try:
            read_into_fd(fd, start, buffer, full)
        finally:
            os.close(fd)
        self._count(as_byte_view(buffer).nbytes)

    def exists(self, path: str) -> bool:
        """Whether a regular file exists at ``path``."""
        return os.path.isfile(self._resolve(path))

    def list(self, prefix: str = "",
             on_refused: Callable[[str, bool, str], None] | None = None,
             on_unreadable: Callable[[str, bool, str], None] | None = None
             ) -> Iterator[ObjectInfo]:
        """Files under the directory ``prefix``, recursively, lazily, sorted by path.

        Temporary files and staging/trash directories of in-flight writes are skipped, as are
        symlinks that point outside the root (reading them fails anyway).

        Args:
            prefix: Directory to list.
            on_refused: Called as ``on_refused(rel, is_dir, message)`` for each symlink (to a
                file or a directory) skipped because it resolves outside the root, when it is
                met in the walk, so that a caller can report it rather than lose it silently.
            on_unreadable: Called the same way for each directory below ``prefix`` that this
                process may not list and each file it may not stat (permission denied): they
                are passed over, and without it silently.

        Raises:
            StorageError: ``prefix`` itself may not be listed.
        """
        top = self._resolve(prefix.rstrip("/"), allow_root=True)
        rel0 = normalize_relpath(prefix.rstrip("/"))
        real_root = os.path.realpath(self.root).rstrip(os.sep) + os.sep

        def denied(rel: str, is_dir: bool, exc: OSError) -> None:
            if on_unreadable is not None:
                what = "list the directory" if is_dir else "read"
                on_unreadable(rel, is_dir, f"permission denied: cannot {what} "
                                           f"{os.path.join(self.root, rel)}")

        walk = walk_sorted(top, rel0, links=on_refused is not None, on_denied=denied)
        try:
            first = next(walk, None)
        except PermissionError as exc:  # the top itself
            raise StorageError(f"permission denied: cannot list the directory {top}") from exc
        for entry in itertools.chain([first] if first else [], walk):
            st = entry.stat
            if entry.link is not None:
                real = os.path.realpath(entry.path)
                if not real.startswith(real_root):
                    # A symlink pointing outside the root: not ours to expose.
                    if on_refused is not None:
                        on_refused(entry.rel, stat.S_ISDIR(st.st_mode),
                                   f"path {entry.rel!r} resolves to {real}, outside the storage "
                                   f"root {self.root}")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # a symlinked directory inside the root: not descended into
            yield ObjectInfo(entry.rel, st.st_size, f"{st.st_mtime_ns}-{st.st_size}")

    def version(self, path: str) -> str:
        """``"<mtime_ns>-<size>"`` of the file."""
        st = self._stat(path)
        return f"{st.st_mtime_ns}-{st.st_size}"

    # -- writing -----------------------------------------------------------------------------
    def put_bytes(self, path: str, data: bytes) -> None:
        """Atomically write ``data`` (temp file + fsync + rename)."""
        full = self._resolve(path)
        self._atomic_write(full, lambda f: f.write(data))

    def put_bytes_if(self, path: str, data: bytes, *, if_version: str | None) -> bool:
        """Compare-and-swap under an exclusive ``flock`` of the file's directory."""
        full = self._resolve(path)
        self._makedirs(os.path.dirname(full))
        dfd = os.open(os.path.dirname(full), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)  # serializes writers on this host's filesystem
            try:
                current = self.version(path)
            except NotFoundError:
                current = None
            if current != if_version:
                return False
            self._atomic_write(full, lambda f: f.write(data))
            return True
        finally:
            os.close(dfd)  # releases the lock

    def put_file(self, path: str, local_path: str) -> None:
        """Atomically copy the local file ``local_path`` to ``path``."""
        full = self._resolve(path)
        try:
            src = open(local_path, "rb")  # noqa: SIM115 - closed below, after the write
        except FileNotFoundError:
            raise NotFoundError(f"local file to upload not found: {local_path}") from None
        with src:
            self._atomic_write(full, lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))

    def writing_file(self, path: str) -> contextlib.AbstractContextManager[str]:
        """A temp file beside ``path``, fsynced and renamed into place when the block exits
        normally (removed when it raises): the bytes are written once, never copied."""
        return self._writing(self._resolve(path))

    @contextlib.contextmanager
    def _writing(self, full: str) -> Iterator[str]:
        """Temp file in ``full``'s directory → fsync → rename over ``full`` → fsync the
        directory; the temp file goes if the block raises. OS errors become StorageError."""
        parent = os.path.dirname(full)
        self._makedirs(parent)
        tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, full)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, IsADirectoryError):
                raise StorageError(f"cannot write {full}: it is a directory") from exc
            if isinstance(exc, OSError):
                raise StorageError(f"writing {full} failed: {exc.strerror or exc}") from exc
            raise
        _fsync_dir(parent)

    def _atomic_write(self, full: str, write: Callable[[BinaryIO], object]) -> None:
        with self._writing(full) as tmp, open(tmp, "xb") as f:
            write(f)

    def _makedirs(self, d: str) -> None:
        try:
            os.makedirs(d, exist_ok=True)
        except FileExistsError as exc:  # a path component is a regular file
            raise StorageError(f"cannot create directory {d}: a file is in the way") from exc

    def scratch_dir(self) -> str:
        """The root itself: files written here are moved into place by :meth:`put_tree`."""
        self._makedirs(self.root)
        return self.root

    def put_tree(self, prefix: str, files: list[tuple[str, str]], move: bool = False) -> None:
        """Publish ``files`` as the directory ``prefix`` in one rename.

        The tree is staged in a sibling ``.staging-<uuid>`` directory; an existing tree is
        renamed aside to ``.trash-<uuid>`` first and removed afterwards, so readers see the old
        tree, no tree, or the complete new one, never a partial one. With ``move``, files on
        this root's filesystem (written in :meth:`scratch_dir`) are renamed into the staging
        directory instead of copied: each adapter's bytes are written once, not twice.
        """
        dest = self._resolve(prefix.rstrip("/"))
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise StorageError(f"cannot publish a tree at {dest}: a file is in the way")
        parent = os.path.dirname(dest)
        self._makedirs(parent)
        staging = os.path.join(parent, f"{STAGING_PREFIX}{uuid.uuid4().hex}")
        trash: str | None = None
        try:
            os.mkdir(staging)
            for rel, local in files:
                rel = normalize_relpath(rel)
                if not rel:
                    raise StorageError(f"empty file path in tree for {dest}")
                target = os.path.join(staging, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    if not (move and _moved(local, target)):
                        with open(local, "rb") as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out, _COPY_CHUNK)
                    _fsync_file(target)  # its bytes on disk before the rename
                except FileNotFoundError as exc:
                    if exc.filename == local:
                        raise NotFoundError(f"local file to upload not found: {local}") from None
                    raise
            for d, _, _ in os.walk(staging):
                _fsync_dir(d)
            if os.path.isdir(dest):
                trash = os.path.join(parent, f"{TRASH_PREFIX}{uuid.uuid4().hex}")
                os.rename(dest, trash)
            try:
                os.rename(staging, dest)
            except OSError:
                if trash is not None:  # put the old tree back rather than leave a hole
                    os.rename(trash, dest)
                    trash = None
                raise
            _fsync_dir(parent)
        except OSError as exc:
            raise StorageError(f"publishing tree {dest} failed: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)

    def delete(self, path: str) -> None:
        """Delete the file at ``path`` if it exists."""
        full = self._resolve(path)
        try:
            os.unlink(full)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except IsADirectoryError as exc:
            raise StorageError(f"cannot delete {full}: it is a directory") from exc
        except OSError as exc:
            if exc.errno == errno.EPERM and os.path.isdir(full):  # macOS reports EPERM
                raise StorageError(f"cannot delete {full}: it is a directory") from exc
            raise StorageError(f"deleting {full} failed: {exc.strerror or exc}") from exc


def _moved(src: str, dst: str) -> bool:
    """Rename ``src`` to ``dst`` when both are on one filesystem (False when they are not)."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    return True


def _fsync_file(path: str) -> None:
    """Persist a file's bytes (whoever wrote them: this process, or one that renamed it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: str) -> None:
    """Persist a directory's entries (renames) where the platform allows it."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; durability is best effort there
    finally:
        os.close(fd)
def sweep_stale_writes(out: Storage, descend: tuple[str, ...] = ()) -> int:
    """Remove what killed writers left under a local ``--out``: ``.tmp-*`` files and
    ``.staging-*`` / ``.trash-*`` trees (never listed or read, but they take space).

    A run owns its ``--out`` while it runs (it holds the lease ``_safelora/lease.json`` there,
    see :mod:`safelora_ray.storage.lease`), so whatever is there when a run starts is stale. Other
    tools' top-level ``_*`` folders (``_nightly``, ``_safelora``) are left alone. Object
    stores need nothing: an interrupted upload is never visible.

    Args:
        out: The output.
        descend: Top-level ``_*`` folders of the tool's own to sweep too (a sanitize's
            ledger and reports).

    Returns:
        How many were removed.
    """
    if not isinstance(out, LocalStorage):
        return 0
    stale = (TMP_PREFIX, STAGING_PREFIX, TRASH_PREFIX)
    removed = 0
    for parent, dirs, files in os.walk(out.root):
        if parent == out.root:
            dirs[:] = [d for d in dirs if not d.startswith("_")
                       or d in descend]
        for name in [d for d in dirs if d.startswith(stale)]:
            dirs.remove(name)
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed += 1
        for name in files:
            if name.startswith(stale):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(parent, name))
                removed += 1
    if removed:
        logger.info("removed %d leftover(s) of an interrupted run under %s", removed, out.uri)
    return removed


