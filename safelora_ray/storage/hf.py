"""Read-only storage over a Hugging Face Hub model repository at a pinned commit.

Files already in the local Hub cache are read from disk; others are fetched with ranged
requests through :class:`huggingface_hub.HfFileSystem`. With ``HF_HUB_OFFLINE`` set, only the
cache is used.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import huggingface_hub.constants
from huggingface_hub import HfApi, HfFileSystem

from safelora_ray.core.errors import NotFoundError, StorageError
from safelora_ray.storage import localfs
from safelora_ray.storage.base import ObjectInfo, Storage
from safelora_ray.storage.uri import normalize_relpath

logger = logging.getLogger(__name__)

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_TRUTHY = {"1", "true", "yes", "on"}


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set to a truthy value (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def hf_cache_dir() -> str:
    """The Hub cache directory: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the default.

    Read from the environment at call time so that a process (or test) that changes it after
    importing huggingface_hub still gets the right directory.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return str(huggingface_hub.constants.HF_HUB_CACHE)


def is_commit_sha(revision: str) -> bool:
    """Whether ``revision`` is a full 40-hex commit sha."""
    return bool(_SHA_RE.match(revision))


class HfStorage(Storage):
    """Files of ``hf://org/name[@revision][/subdir]`` (a model repo), read-only.

    The revision (default ``main``) is resolved to a commit sha once, at construction, so that
    every read sees the same commit; pickled copies (Ray workers) keep that commit.

    Args:
        rest: The URI without ``hf://``: ``org/name[@revision][/subdir]``.
        commit: An already resolved commit sha for the revision (skips resolution).

    Attributes:
        repo_id: ``org/name``.
        revision: The revision as given, unquoted (``main`` if none).
        subdir: Path inside the repo of the storage root (may be empty).
        commit: The resolved 40-hex commit sha.
    """

    def __init__(self, rest: str, commit: str | None = None) -> None:
        self._rest = rest
        parts = rest.strip("/").split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise StorageError(
                f"hf:// URI must be hf://org/name[@revision][/subdir], got 'hf://{rest}'"
            )
        name, _, raw_revision = parts[1].partition("@")
        if not name or ("@" in parts[1] and not raw_revision):
            raise StorageError(f"invalid repo name or empty revision in 'hf://{rest}'")
        self.repo_id = f"{parts[0]}/{name}"
        # Revisions with "/" (refs/pr/1) are written URL-quoted (refs%2Fpr%2F1), as in
        # HfFileSystem paths, since "/" starts the subdir.
        self.revision = unquote(raw_revision) if raw_revision else "main"
        self.subdir = normalize_relpath("/".join(parts[2:])) if len(parts) > 2 else ""
        root = f"hf://{self.repo_id}@{raw_revision or 'main'}"
        self.uri = f"{root}/{self.subdir}" if self.subdir else root
        self._fs_obj: Any = None
        self._lock = threading.Lock()
        if commit is not None:
            if not is_commit_sha(commit):
                raise StorageError(f"not a commit sha: {commit!r} (for {self.uri})")
            self.commit = commit
        else:
            self.commit = self._resolve_commit()

    def __reduce__(self):  # keep the resolved commit so workers read exactly what we read
        return (HfStorage, (self._rest, self.commit))

    def __repr__(self) -> str:
        return f"HfStorage({self.uri!r}, commit={getattr(self, 'commit', None)!r})"

    # -- resolution --------------------------------------------------------------------------
    @property
    def repo_cache(self) -> str:
        """The repo's folder in the Hub cache (``models--org--name``)."""
        return os.path.join(hf_cache_dir(), "models--" + self.repo_id.replace("/", "--"))

    def _resolve_commit(self) -> str:
        if is_commit_sha(self.revision):
            return self.revision
        if hf_offline():
            ref = os.path.join(self.repo_cache, "refs", *self.revision.split("/"))
            try:
                with open(ref, encoding="utf-8") as f:
                    sha = f.read().strip()
            except FileNotFoundError:
                raise NotFoundError(
                    f"cannot resolve revision {self.revision!r} of {self.uri}: HF_HUB_OFFLINE is "
                    f"set and the Hub cache has no ref for it ({ref} is missing); download the "
                    f"repo first or pass a commit sha"
                ) from None
            if not is_commit_sha(sha):
                raise StorageError(f"corrupt Hub cache ref {ref}: {sha[:80]!r} is not a commit sha")
            return sha
        try:
            info = HfApi().model_info(self.repo_id, revision=self.revision)
        except Exception as exc:
            raise self._hub_error(exc, "", "resolve revision") from exc
        sha = getattr(info, "sha", None)
        if not sha or not is_commit_sha(str(sha)):
            raise StorageError(f"the Hub returned no commit sha for {self.uri}")
        logger.debug("resolved %s to commit %s", self.uri, sha)
        return str(sha)

    def _hub_error(self, exc: Exception, path: str, op: str) -> StorageError:
        """A StorageError/NotFoundError for a failed Hub call (never includes tokens)."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = self.describe(path)
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, GatedRepoError):
            return StorageError(f"{op} {where}: the repo is gated; accept its terms and log in")
        if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)):
            return NotFoundError(f"{where} not found on the Hub ({type(exc).__name__})")
        if isinstance(exc, (EntryNotFoundError, FileNotFoundError)):
            return NotFoundError(f"{where} not found at commit {self.commit}")
        # Only the type and HTTP status: Hub error texts can quote (signed) redirect URLs.
        status = getattr(getattr(exc, "response", None), "status_code", None)
        detail = f"{type(exc).__name__}, HTTP {status}" if status else type(exc).__name__
        return StorageError(f"{op} {where} failed ({detail})")

    # -- paths -------------------------------------------------------------------------------
    def _repo_path(self, path: str) -> str:
        rel = normalize_relpath(path)
        if not rel:
            raise StorageError(f"empty object path under {self.uri}")
        return f"{self.subdir}/{rel}" if self.subdir else rel

    def _snapshot(self) -> str:
        return os.path.join(self.repo_cache, "snapshots", self.commit)

    def _cached(self, repo_path: str) -> str | None:
        """The cached file for ``repo_path`` at our commit, if the cache has it."""
        full = os.path.join(self._snapshot(), *repo_path.split("/"))
        if not os.path.isfile(full):
            return None
        # Snapshot entries are symlinks into ../../blobs; anything resolving outside the
        # repo's cache folder is not ours to read.
        real_cache = os.path.realpath(self.repo_cache).rstrip(os.sep) + os.sep
        if not os.path.realpath(full).startswith(real_cache):
            raise StorageError(f"cached file {full} resolves outside the Hub cache folder")
        return full

    def _missing_offline(self, repo_path: str) -> NotFoundError:
        return NotFoundError(
            f"{self.describe(self._rel(repo_path))} is not in the local Hub cache "
            f"({os.path.join(self._snapshot(), repo_path)}) and HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded"
        )

    def _rel(self, repo_path: str) -> str:
        return repo_path[len(self.subdir) + 1 :] if self.subdir else repo_path

    @property
    def _fs(self) -> Any:
        if self._fs_obj is None:
            with self._lock:
                if self._fs_obj is None:
                    self._fs_obj = HfFileSystem()
        return self._fs_obj

    def _fs_path(self, repo_path: str) -> str:
        return f"{self.repo_id}/{repo_path}"

    def _remote_info(self, path: str, repo_path: str) -> dict[str, Any]:
        try:
            info = self._fs.info(self._fs_path(repo_path), revision=self.commit)
        except Exception as exc:
            raise self._hub_error(exc, path, "stat") from exc
        if info.get("type") != "file":
            raise NotFoundError(f"{self.describe(path)} is not a file at commit {self.commit}")
        return info

    # -- reading -----------------------------------------------------------------------------
    def size(self, path: str) -> int:
        """Size of the file in bytes (cache first, then the Hub)."""
        rp = self._repo_path(path)
        local = self._cached(rp)
        if local is not None:
            return os.path.getsize(local)
        if hf_offline():
            raise self._missing_offline(rp)
        return int(self._remote_info(path, rp)["size"])

    def read_range(self, path: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``start`` (pread from the cache or a ranged GET)."""
        localfs.check_range(start, length)
        rp = self._repo_path(path)
        local = self._cached(rp)
        if local is not None:
            fd = os.open(local, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                data = localfs.read_range_fd(fd, start, length, self.describe(path))
            finally:
                os.close(fd)
            self._count(len(data))
            return data
        if hf_offline():
            raise self._missing_offline(rp)
        size = int(self._remote_info(path, rp)["size"])
        if start + length > size:
            raise StorageError(
                f"byte range [{start}, {start + length}) is past the end of "
                f"{self.describe(path)} ({size} bytes)"
            )
        if length == 0:
            return b""
        try:
            data = self._fs.cat_file(
                self._fs_path(rp), revision=self.commit, start=start, end=start + length
            )
        except Exception as exc:
            raise self._hub_error(exc, path, "read") from exc
        if len(data) != length:
            raise StorageError(
                f"short read from {self.describe(path)}: wanted bytes [{start}, {start + length}) "
                f"but got {len(data)}"
            )
        self._count(len(data))
        return bytes(data)

    def read_into(self, path: str, start: int, buffer: memoryview, *,
                  if_version: str | None = None) -> None:
        """Fill ``buffer``; cached files are read with ``preadv`` straight into it."""
        localfs.check_range(start, len(buffer))
        self._check_version(path, if_version)
        rp = self._repo_path(path)
        local = self._cached(rp)
        if local is None:
            view = localfs.as_byte_view(buffer)
            view[:] = self.read_range(path, start, len(view))
            return
        fd = os.open(local, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            localfs.read_into_fd(fd, start, buffer, self.describe(path))
        finally:
            os.close(fd)
        self._count(localfs.as_byte_view(buffer).nbytes)

    def exists(self, path: str) -> bool:
        """Whether the file exists at the commit (cache first, then the Hub)."""
        rp = self._repo_path(path)
        if self._cached(rp) is not None:
            return True
        if hf_offline():
            return False
        try:
            self._remote_info(path, rp)
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Files under ``prefix`` at the commit, sorted by path.

        Offline this walks the cached snapshot (lazily); online it lists the repo tree on the
        Hub (one paginated listing, sorted before yielding).
        """
        rel = normalize_relpath(prefix.rstrip("/"))
        base = "/".join(p for p in (self.subdir, rel) if p)
        if hf_offline():
            snap = self._snapshot()
            if not os.path.isdir(snap):
                raise NotFoundError(
                    f"{self.uri} (commit {self.commit}) is not in the local Hub cache "
                    f"({snap} is missing) and HF_HUB_OFFLINE is set"
                )
            top = os.path.join(snap, *base.split("/")) if base else snap
            for entry in localfs.walk_sorted(top, base):
                version = (
                    os.path.basename(entry.link) if entry.link else f"{self.commit}:{entry.rel}"
                )
                yield ObjectInfo(self._rel(entry.rel), entry.stat.st_size, version)
            return
        try:
            entries = [
                e
                for e in HfApi().list_repo_tree(
                    self.repo_id, path_in_repo=base or None, recursive=True, revision=self.commit
                )
                if hasattr(e, "blob_id")  # files only; folders have no blob id
            ]
        except Exception as exc:
            raise self._hub_error(exc, rel, "list") from exc
        entries.sort(key=lambda e: e.path)
        for e in entries:
            yield ObjectInfo(self._rel(e.path), int(e.size), _blob_version(e))

    def _cached_version(self, repo_path: str, full: str) -> str:
        # The snapshot symlink's target is named after the blob id (git sha1 or LFS sha256),
        # the same id the Hub reports; fall back to commit:path for copied (non-symlink) files.
        if os.path.islink(full):
            return os.path.basename(os.readlink(full))
        return f"{self.commit}:{repo_path}"

    def version(self, path: str) -> str:
        """The blob id when known (cache symlink or Hub metadata), else ``commit:path``."""
        rp = self._repo_path(path)
        local = self._cached(rp)
        if local is not None:
            return self._cached_version(rp, local)
        if hf_offline():
            raise self._missing_offline(rp)
        info = self._remote_info(path, rp)
        lfs = info.get("lfs")
        if isinstance(lfs, dict) and lfs.get("sha256"):
            return str(lfs["sha256"])
        if info.get("blob_id"):
            return str(info["blob_id"])
        return f"{self.commit}:{rp}"

    def local_path(self, path: str) -> str | None:
        """The cached file's path, when the cache has it."""
        return self._cached(self._repo_path(path))

    # -- writing (refused) -------------------------------------------------------------------
    def _read_only(self, path: str) -> StorageError:
        return StorageError(f"cannot write {self.describe(path)}: hf:// is read-only")

    def put_bytes(self, path: str, data: bytes | bytearray) -> None:
        """Refused: hf:// is read-only."""
        raise self._read_only(path)

    def put_file(self, path: str, local_path: str) -> None:
        """Refused: hf:// is read-only."""
        raise self._read_only(path)

    def put_tree(self, prefix: str, files: list[tuple[str, str]], move: bool = False,
                 cache: bool = True) -> None:
        """Refused: hf:// is read-only."""
        raise self._read_only(prefix)

    def delete(self, path: str) -> None:
        """Refused: hf:// is read-only."""
        raise self._read_only(path)


def _blob_version(entry: Any) -> str:
    """The id naming a listed file's blob in the cache: LFS sha256, else the git blob sha1."""
    lfs = getattr(entry, "lfs", None)
    sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
    return str(sha256 or entry.blob_id)
