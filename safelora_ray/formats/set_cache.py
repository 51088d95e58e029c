"""A node's copy of an alignment set that lives on an object store, kept on its local disk.

A set is immutable and named by its content id, so a copy made once serves every later run
on the node: a nightly fleet reads its set (4 GiB for a 7B pair, 40 GiB for a 70B one) from
the object store once, not every night, and its workers map the copy's files (the page
cache's pages, one copy per node) instead of holding the set in fresh memory or in Ray's
object store. The copy is made under ``$SAFELORA_SET_CACHE`` (default
``$XDG_CACHE_HOME/safelora/sets``, else ``~/.cache/safelora/sets``; ``off`` turns it off), in
``<content id>/``, as the set's own layout:

- it is filled in a temporary directory, every shard checked against the size and SHA-256
  that the set's ``alignment.json`` records, then renamed into place: a copy that exists is
  whole (a run killed while filling leaves only a temporary directory, removed by the next
  fill);
- one process of a node fills it while the others wait (a lock file);
- where the disk lacks room for it (and :data:`KEEP_FREE_FRACTION` of the disk besides, at
  most 4 GiB), the copies of other sets are removed for it, least recently used first (each
  run touches the copy it uses); where that is not enough, or the copy cannot be written,
  the run reads the set from the object store as before, with a warning;
- each run still checks the copy's tensors against the manifest's digests as it maps them;
  a copy found corrupt is removed (:func:`evict`) and the set read from its origin.

Nothing else is written there but a lock file per set, and any entry may be deleted at any
time (a run that maps it keeps its pages until it ends).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from safelora_ray.core.errors import AlignmentSetError, SafeLoraError
from safelora_ray.formats.alignment_set import FORMAT, MANIFEST_FILE, METADATA_FILE, AlignmentSet

logger = logging.getLogger(__name__)

CACHE_ENV = "SAFELORA_SET_CACHE"
#: What a copy must leave free on the cache's disk: this share of it, at most
#: :data:`KEEP_FREE_MAX_BYTES` (a large disk is not held to a twentieth of itself).
KEEP_FREE_FRACTION = 0.05
KEEP_FREE_MAX_BYTES = 4 * 1024**3
#: Shards copied at once, and the window each is streamed through (two per shard, reused:
#: fresh memory is what costs on a VM). A window is several of an object store's parts,
#: fetched in parallel: 64 MiB copied a 2 GiB shard from SeaweedFS in 4.2-4.4 s against
#: 16 MiB's 5.0 s, one step after another; with the next window fetched while one is hashed
#: and written, 2.4-2.6 s.
FILL_THREADS = 4
WINDOW_BYTES = 64 * 1024 * 1024
_BLOCK = 4096  # O_DIRECT's alignment of offsets and lengths (a multiple of any block size)
_OFF = {"", "0", "off", "none", "false", "no"}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a content id, used as a folder name
_CONTENT_ID = re.compile(r"als-[0-9a-f]{8,64}")  # what a build names its sets


def cache_root() -> Path | None:
    """Where copies are kept (``$SAFELORA_SET_CACHE``), or None when turned off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safelora" / "sets"


def local_copy(aset: AlignmentSet, cancelled: Callable[[], bool] | None = None
               ) -> AlignmentSet:
    """``aset`` itself where its shards are already files here or the cache is off; else this
    node's copy of it, made now if there is none (see the module docstring).

    Args:
        aset: The set.
        cancelled: Polled between the windows of a copy being made: once it says so, the
            copy is given up (a stopped run does not wait minutes for a 70B set's).

    Raises:
        CopyCancelled: ``cancelled`` said so; nothing of the copy is left.
        AlignmentSetError: the set's own bytes are corrupt (a shard that does not match its
            recorded SHA-256 while it is copied).
    """
    root = cache_root()
    integrity = aset.metadata.get("integrity")
    if (root is None or aset.local_shards() is not None or not isinstance(integrity, dict)
            or not _SAFE_NAME.fullmatch(aset.content_id)):
        return aset  # (a set without digests could not be checked as it is copied)
    final = root / aset.content_id
    try:
        if not final.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            with _locked(root / f".{aset.content_id}.lock"):
                if not final.is_dir():  # another process may have filled it meanwhile
                    _fill(aset, integrity, root, final, cancelled)
        else:
            with contextlib.suppress(OSError):  # its last use: the last copy evicted for room
                os.utime(final)
        copy = AlignmentSet.open(str(final), expect=aset.content_id)
    except AlignmentSetError as e:
        if final.is_dir():  # the copy, not the set: read the set itself
            evict(final, str(e))
            return aset
        raise
    except (OSError, _NoRoom, SafeLoraError) as e:
        logger.warning("alignment set %s: no copy on this node's disk (%s); it is read from "
                       "%s", aset.content_id, e, aset.uri)
        return aset
    logger.debug("alignment set %s: this node's copy %s", aset.content_id, final)
    return copy


def evict(copy: AlignmentSet | Path, why: str, damaged: bool = True) -> None:
    """Remove this node's copy of a set (found corrupt or damaged, or for room: ``why``),
    renamed away first: a run that maps it is unharmed, the next one copies the set again."""
    path = copy if isinstance(copy, Path) else Path(str(copy.storage.local_path(METADATA_FILE))
                                                    ).parent
    if damaged:
        logger.warning("alignment set copy %s removed (%s); the set is read from its origin "
                       "and copied again by the next run", path, why)
    else:
        logger.info("alignment set copy %s removed: %s", path, why)
    gone = path.with_name(f".evicted-{path.name}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):
        path.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)


class CopyCancelled(Exception):
    """A copy given up because its run was stopped (:func:`local_copy`'s ``cancelled``)."""


class _NoRoom(Exception):
    pass


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fill(aset: AlignmentSet, integrity: dict[str, Any], root: Path, final: Path,
          cancelled: Callable[[], bool] | None) -> None:
    """Copy the set into ``final`` (under the lock): checked, then renamed into place."""
    shards: dict[str, Any] = integrity.get("shards") or {}
    need = sum(int(rec.get("bytes") or 0) for rec in shards.values())
    _make_room(root, need, aset.content_id)
    for old in root.glob(f".tmp-{aset.content_id}-*"):  # a killed fill's (we hold the lock)
        shutil.rmtree(old, ignore_errors=True)
    tmp = root / f".tmp-{aset.content_id}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "shards").mkdir(parents=True)
        for name in (METADATA_FILE, MANIFEST_FILE):
            (tmp / name).write_bytes(aset.storage.read(name))
        logger.info("alignment set %s: copying %d shard(s), %.2f GiB, from %s to this node's "
                    "cache %s", aset.content_id, len(shards), need / 2**30, aset.uri, final)
        with ThreadPoolExecutor(min(FILL_THREADS, max(len(shards), 1)),
                                thread_name_prefix="safelora-set-copy") as pool:
            list(pool.map(lambda item: _copy_shard(aset, item[0], item[1], tmp, cancelled),
                          sorted(shards.items())))
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_room(root: Path, need: int, for_id: str) -> None:
    """Room for ``need`` bytes in ``root`` (and the share of its disk kept free), the copies of
    other sets removed for it least recently used first (a set's copy is touched at each run
    that uses it: a rebuilt set's old copies go, not the one every night maps); none removed
    where removing them all would not be enough.

    Raises:
        _NoRoom: not enough room, even with every other copy removed.
    """
    def lacking() -> int:
        free, total = _disk(root)
        return need + int(min(KEEP_FREE_FRACTION * total, KEEP_FREE_MAX_BYTES)) - free

    short = lacking()
    if short <= 0:
        return
    others = []
    for entry in root.iterdir():  # only sets' copies: the folder may be shared (e.g. /tmp)
        if entry.name != for_id and _is_copy(entry):
            with contextlib.suppress(OSError):
                others.append((entry.stat().st_mtime, entry, _size(entry)))
    free, total = _disk(root)
    why = (f"{need / 2**30:.2f} GiB needed in {root}, {free / 2**30:.2f} GiB free of "
           f"{total / 2**30:.2f} GiB")
    if sum(n for _, _, n in others) < short:
        raise _NoRoom(why + (f", {len(others)} other set cop{'y' if len(others) == 1 else 'ies'}"
                             " too small to make room" if others else ""))
    for _, entry, _ in sorted(others):
        evict(entry, f"the least recently used, for alignment set {for_id}'s copy ({why})",
              damaged=False)
        if lacking() <= 0:
            return
    raise _NoRoom(why)


def _is_copy(entry: Path) -> bool:
    """Whether ``entry`` is a set's copy made here: named by a content id, holding the set's
    metadata."""
    if not _CONTENT_ID.fullmatch(entry.name):
        return False
    try:
        meta = json.loads((entry / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _size(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def _disk(root: Path) -> tuple[int, int]:
    """Free and total bytes of ``root``'s filesystem."""
    usage = shutil.disk_usage(root)
    return usage.free, usage.total


def _copy_shard(aset: AlignmentSet, path: str, rec: dict[str, Any], tmp: Path,
                cancelled: Callable[[], bool] | None) -> None:
    """Copy one shard window by window, checked against its recorded SHA-256.

    The three steps of a window overlap: while a window is hashed here and written by the
    writer thread, the next one is fetched (the GETs, the hash and the disk each wait on
    their own; one after the other, a 2 GiB shard took ~4.5 s on SeaweedFS with the two
    cores half idle, docs/benchmarks.md §15.11). Two windows, each reused: fresh memory is
    what costs on a VM."""
    size = int(rec.get("bytes") or 0)
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise AlignmentSetError(f"{aset.uri}: shard path {path!r} in {METADATA_FILE} leaves "
                                "the set")
    dest = tmp / path
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    window = max(min(WINDOW_BYTES, size), 1)
    offsets = list(range(0, size, WINDOW_BYTES))
    # page-aligned, as O_DIRECT needs
    bufs = [mmap.mmap(-1, window) for _ in range(min(len(offsets), 2) or 1)]

    def fetch(i: int) -> memoryview:
        off = offsets[i]
        view = memoryview(bufs[i % len(bufs)])[:min(WINDOW_BYTES, size - off)]
        try:
            aset.storage.read_into(path, off, view)
        except SafeLoraError as e:
            raise OSError(f"{aset.storage.describe(path)}: {e}") from None
        return view

    with _DestFile(dest) as out, ThreadPoolExecutor(
            2, thread_name_prefix="safelora-set-window") as helpers:
        nxt = helpers.submit(fetch, 0) if offsets else None
        for i in range(len(offsets)):
            if cancelled is not None and cancelled():
                raise CopyCancelled(f"the copy of alignment set {aset.content_id} was given "
                                    "up: its run was stopped")
            assert nxt is not None
            view = nxt.result()
            # The other buffer is free: its window was hashed and written in the last turn.
            nxt = helpers.submit(fetch, i + 1) if i + 1 < len(offsets) else None
            written = helpers.submit(out.write, view)
            h.update(view)
            written.result()
    # Not fsynced: a copy that a crash left short or zeroed fails the digests every run checks
    # as it maps the copy, and is then removed (syncing 4 GiB would slow every first run).
    if f"sha256:{h.hexdigest()}" != rec.get("sha256"):
        _raise_for_tensor(aset, path, dest)
        raise AlignmentSetError(
            f"{aset.storage.describe(path)} is corrupt: its SHA-256 does not match the one "
            f"written when alignment set {aset.content_id} was built; rebuild it")


class _DestFile:
    """A copy's shard written around the page cache (``O_DIRECT``) where the filesystem
    allows it, else through it.

    Why: on a VM whose host backs fresh guest pages lazily, copying 2 GiB into new page-cache
    pages cost 8-16 s of CPU; written directly 0.1 s, and mapping the copy afterwards (the
    disk's reads filling the page cache) 0.7-4.2 s (docs/benchmarks.md §15.5).
    """

    def __init__(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0)
        try:
            self.fd = os.open(path, flags | direct, 0o644)
            self.direct = bool(direct)
        except OSError:  # a filesystem without O_DIRECT (tmpfs)
            self.fd = os.open(path, flags, 0o644)
            self.direct = False

    def write(self, data: memoryview) -> None:
        aligned = len(data) - len(data) % _BLOCK if self.direct else 0
        if aligned:
            try:
                self._write_all(data[:aligned])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered()  # the flag was accepted, not the writes
                self._write_all(data[:aligned])
        if aligned < len(data):
            self._buffered()  # a shard's unaligned tail; O_DIRECT writes no partial block
            self._write_all(data[aligned:])

    def _write_all(self, data: memoryview) -> None:
        while data:
            data = data[os.write(self.fd, data):]

    def _buffered(self) -> None:
        if self.direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL,
                        fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))
            self.direct = False

    def __enter__(self) -> _DestFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _raise_for_tensor(aset: AlignmentSet, shard: str, copy: Path) -> None:
    """The error naming the tensor whose bytes differ from its digest, where one does (the
    damage may be elsewhere: its header)."""
    data = memoryview(copy.read_bytes())  # a corrupt shard's: this path is the error's only
    for module, row in aset.rows.items():
        if row.shard == shard:
            _, start, n = aset.stored_range(module)
            aset.from_bytes(module, data[start:start + n], verify=True)


__all__ = ["CACHE_ENV", "KEEP_FREE_FRACTION", "KEEP_FREE_MAX_BYTES", "CopyCancelled",
           "cache_root", "evict", "local_copy"]
