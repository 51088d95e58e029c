"""Where a command may write: never over an input, and only where it really can.

Every location a command writes goes through :func:`check_outputs` (when its config is made:
never equal to, inside or around an input; no file where a folder goes) and
:func:`probe_outputs` (when the run starts, before any work: no existing file overwritten
without ``--force``, and the location really is writable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from safelora_ray.core.errors import ConfigError, StorageError
from safelora_ray.storage.registry import open_storage
from safelora_ray.storage.uri import check_uri, refuse_overlap, split_uri

logger = logging.getLogger(__name__)

PROBE_PREFIX = ".safelora-probe-"


@dataclass(frozen=True)
class Output:
    """A location a command writes.

    Attributes:
        flag: How to name it in messages (``--out``, ``output_root``).
        uri: The path or URI.
        file: One file (``salora-export --out``); else a folder, created when missing.
        replaceable: For a file: says whether an existing file there may be replaced without
            ``--force`` (this tool's own earlier output of the same input).
    """

    flag: str
    uri: str
    file: bool = False
    replaceable: Callable[[str], bool] | None = None


def _local_path(uri: str) -> str | None:
    scheme, rest = split_uri(uri)
    return os.path.abspath(os.path.expanduser(rest)) if scheme == "file" else None


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_outputs(outputs: Sequence[Output], inputs: Sequence[tuple[str, str, str]]) -> None:
    """The checks an output passes when a config is made (no I/O but a local ``stat``).

    Each output is a valid URI, never equal to, inside or around an input (local paths after
    resolving links; S3 by bucket and prefix), and locally no file stands where a folder goes
    (neither at the output itself, for a folder, nor at any folder above it).

    Args:
        outputs: What the command writes.
        inputs: ``(flag, uri, why)`` of what it reads; ``why`` says what would go wrong.

    Raises:
        ConfigError: naming the flag and the location.
    """
    for o in outputs:
        check_uri(o.uri, o.flag)
        for in_flag, in_uri, why in inputs:
            refuse_overlap(o.uri, o.flag, in_uri, in_flag, why)
        path = _local_path(o.uri)
        if path is None:
            continue
        real = os.path.realpath(path)
        if o.file and os.path.isdir(real):
            raise ConfigError(f"{o.flag} {o.uri} is a folder: it names the file to write")
        if not o.file and os.path.lexists(real) and not os.path.isdir(real):
            raise ConfigError(f"{o.flag} {o.uri} is an existing file: a folder is written "
                              f"there, and a file is never replaced by one; choose another "
                              f"{o.flag}")
        above = _nearest_existing(os.path.dirname(real))
        if not os.path.isdir(above):
            raise ConfigError(f"{o.flag} {o.uri}: {above} is a file, not a folder")


def probe_outputs(outputs: Sequence[Output], force: bool = False) -> None:
    """The checks an output passes when the run starts, before any work: an existing file is
    replaced only with ``force`` (or when :attr:`Output.replaceable` says so), and each
    location is writable: locally a probe file is created and removed in the output folder
    (or the nearest folder above it that exists: the one the run creates its folder in); on
    S3 a probe object is put and deleted under the output prefix.

    Raises:
        ConfigError: an existing file without ``force`` (a usage error, exit 2).
        StorageError: a location that cannot be written (exit 1), in one line naming the flag.
    """
    for o in outputs:
        path = _local_path(o.uri)
        if path is not None:
            _probe_local(o, path, force)
            continue
        where, name = o.uri.rstrip("/").rsplit("/", 1) if o.file else (o.uri, "")
        try:
            storage = open_storage(where)
            if o.file and storage.exists(name):
                _refuse_replacing(o, force)
            probe = PROBE_PREFIX + uuid.uuid4().hex
            storage.put_bytes(probe, b"")
        except StorageError as e:
            raise StorageError(f"{o.flag} {o.uri} is not writable: {e}") from None
        try:
            storage.delete(probe)
        except StorageError as e:  # writable all the same; say what was left
            logger.warning("could not remove the probe object %s: %s",
                           storage.describe(probe), e)


def _refuse_replacing(o: Output, force: bool) -> None:
    """An existing file at ``o`` is replaced only with ``force`` or when ``o`` allows it."""
    if not force and not (o.replaceable is not None and o.replaceable(o.uri)):
        raise ConfigError(f"{o.flag} {o.uri} already exists: pass --force to replace it")


def _probe_local(o: Output, path: str, force: bool) -> None:
    real = os.path.realpath(path)
    if o.file and os.path.lexists(real):
        _refuse_replacing(o, force)
    folder = real if not o.file and os.path.isdir(real) else \
        _nearest_existing(os.path.dirname(real) if o.file else real)
    probe = os.path.join(folder, PROBE_PREFIX + uuid.uuid4().hex)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise StorageError(f"{o.flag} {o.uri} is not writable: {folder}: "
                           f"{e.strerror or e}") from None
    with contextlib.suppress(OSError):
        os.unlink(probe)


__all__ = ["PROBE_PREFIX", "Output", "check_outputs", "probe_outputs"]
