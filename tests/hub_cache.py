"""Write a fake Hugging Face Hub cache laid out exactly like ``huggingface_hub`` does.

Layout (see ``huggingface_hub.file_download``)::

    <cache>/models--org--name/
        blobs/<etag>                       file contents; etag = LFS sha256 or git blob sha1
        snapshots/<commit>/<path>          relative symlinks to ../../blobs/<etag>
        refs/<revision>                    the commit sha (no trailing newline)
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib

logger = logging.getLogger(__name__)

#: Suffixes the Hub stores with Git LFS (their blobs are named by sha256, not git sha1).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".npz")
#: Files at least this large are LFS files on the Hub.
LFS_MIN_SIZE = 10 * 1024 * 1024


def _read(content: bytes | pathlib.Path) -> bytes:
    return content if isinstance(content, bytes) else pathlib.Path(content).read_bytes()


def blob_id(path: str, data: bytes) -> str:
    """The etag the Hub gives a file: sha256 for LFS files, the git blob sha1 otherwise."""
    if path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_folder(cache_dir: str | os.PathLike[str], repo_id: str) -> pathlib.Path:
    """``<cache>/models--org--name``."""
    return pathlib.Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def write_hub_repo(
    cache_dir: str | os.PathLike[str],
    repo_id: str,
    files: dict[str, bytes | pathlib.Path],
    revision: str = "main",
) -> str:
    """Lay out ``files`` as one commit of model repo ``repo_id`` in a Hub cache.

    Args:
        cache_dir: The Hub cache directory (what ``HF_HUB_CACHE`` points to).
        repo_id: ``org/name``.
        files: Repo paths to contents (bytes, or a local file to copy).
        revision: Branch/tag to point at the commit (written under ``refs/``), or a 40-hex
            commit sha to use as the commit itself (then no ref is written, like the Hub
            client does).

    Returns:
        The commit sha: ``revision`` if it is a sha, else a sha1 derived from the contents (so
        the same files give the same commit).
    """
    root = repo_folder(cache_dir, repo_id)
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    payload = {path: _read(content) for path, content in sorted(files.items())}
    ids = {path: blob_id(path, data) for path, data in payload.items()}
    is_sha = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    if is_sha:
        commit = revision
    else:
        h = hashlib.sha1(repo_id.encode())
        for path, bid in ids.items():
            h.update(f"\0{path}\0{bid}".encode())
        commit = h.hexdigest()
    snapshot = root / "snapshots" / commit
    for path, data in payload.items():
        blob = blobs / ids[path]
        if not blob.exists():
            tmp = blob.with_name(blob.name + ".incomplete")
            tmp.write_bytes(data)
            os.replace(tmp, blob)
        link = snapshot.joinpath(*path.split("/"))
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        # Relative like huggingface_hub's _create_symlink, so the cache can be moved.
        os.symlink(os.path.relpath(blob, link.parent), link)
    snapshot.mkdir(parents=True, exist_ok=True)
    if not is_sha:
        ref = root / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return commit
