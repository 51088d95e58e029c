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
from typing import BinaryIO

from safelora_ray.core.errors import NotFoundError, StorageError
from safelora_ray.storage.base import STAGING_PREFIX, ObjectInfo, Storage
from safelora_ray.storage.localfs import (
    TMP_PREFIX,
    TRASH_PREFIX,
    as_byte_view,
    check_range,
    read_into_fd,
    read_range_fd,
    walk_sorted,
)
from safelora_ray.storage.uri import normalize_relpath

logger = logging.getLogger(__name__)

_COPY_CHUNK = 8 * 1024 * 1024


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
        self._real: str | None = None

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def __reduce__(self):  # re-open the root on the other side
        return (LocalStorage, (self.root,))

    # -- paths -------------------------------------------------------------------------------
    def _real_root(self) -> str:
        """The root's real (symlink-resolved) path, looked up once the root exists: every
        path's check needs it, and each lookup costs an ``lstat`` per component of the root.
        A root re-pointed afterwards fails closed: its paths resolve outside the one kept."""
        if self._real is not None:
            return self._real
        real = os.path.realpath(self.root)
        if os.path.isdir(real):
            self._real = real
        return real

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
        real_root = self._real_root()
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

    def read_into(self, path: str, start: int, buffer: memoryview, *,
                  if_version: str | None = None) -> None:
        """Read straight into ``buffer`` with ``preadv`` (no intermediate bytes object)."""
        check_range(start, len(buffer))
        self._check_version(path, if_version)
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
        real_root = self._real_root().rstrip(os.sep) + os.sep

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
    def put_bytes(self, path: str, data: bytes | bytearray) -> None:
        """Atomically write ``data`` (temp file + fsync + rename)."""
        full = self._resolve(path)
        self._atomic_write(full, lambda f: f.write(data))

    def put_bytes_if(self, path: str, data: bytes, *, if_version: str | None) -> bool:
        """Compare-and-swap under an exclusive ``flock`` of the file's directory."""
        full = self._resolve(path)
        dfd = _locked_dir(os.path.dirname(full), self._makedirs)
        try:
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

    def put_tree(self, prefix: str, files: list[tuple[str, str | bytes | bytearray]],
                 move: bool = False, cache: bool = True) -> None:
        """Publish ``files`` as the directory ``prefix`` in one rename.

        The tree is staged in a sibling ``.staging-<uuid>`` directory; an existing tree is
        renamed aside to ``.trash-<uuid>`` first and removed afterwards, so readers see the old
        tree, no tree, or the complete new one, never a partial one. With ``move``, files on
        this root's filesystem (written in :meth:`scratch_dir`) are renamed into the staging
        directory instead of copied: each adapter's bytes are written once, not twice.

        With ``cache=False`` each file's pages leave the page cache once fsynced: a fleet's
        outputs (gigabytes, written once, not read back by the run) then do not push the
        inputs and the set out of memory, and each write reuses the pages the one before
        freed. Faulting in fresh pages cost 50 ms of CPU per 8 MB written on a VM here,
        against 3 ms reusing them (docs/benchmarks.md §14.1d).
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
                    if isinstance(local, (bytes, bytearray)):
                        with open(target, "wb") as out:
                            out.write(local)
                    elif not (move and _moved(local, target)):
                        with open(local, "rb") as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out, _COPY_CHUNK)
                    _fsync_file(target, drop_cache=not cache)  # on disk before the rename
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


def _locked_dir(d: str, makedirs: Callable[[str], None]) -> int:
    """A descriptor of directory ``d`` (made if missing) under an exclusive ``flock``. A lease's
    release removes the empty directories it made, under the same lock: a directory removed
    between making and locking it is made again."""
    for _ in range(5):
        makedirs(d)
        try:
            dfd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            continue
        fcntl.flock(dfd, fcntl.LOCK_EX)  # serializes writers on this host's filesystem
        if os.path.isdir(d) and os.stat(d).st_ino == os.fstat(dfd).st_ino:
            return dfd
        os.close(dfd)  # removed while we waited for the lock
    raise StorageError(f"directory {d} keeps disappearing while it is written to")


def remove_empty_dir(d: str) -> bool:
    """Remove directory ``d`` if it is empty, under the lock writers of :func:`_locked_dir`
    take (so that a writer never loses the directory it is about to write in). Returns
    whether it was removed."""
    try:
        dfd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return False
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        os.rmdir(d)
        return True
    except OSError:
        return False
    finally:
        os.close(dfd)


def _fsync_file(path: str, drop_cache: bool = False) -> None:
    """Persist a file's bytes (whoever wrote them: this process, or one that renamed it);
    with ``drop_cache``, then drop its now clean pages from the page cache (advisory: a
    no-op where the platform lacks it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop_cache and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):  # advice only: it never fails a durable write
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
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
