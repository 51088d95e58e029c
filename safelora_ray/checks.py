"""Validation shared by the configs (build, sanitize, nightly).

Messages name the command-line flags (``--num-proj-layers``), which is what most users typed;
the nightly job rewrites them into its YAML keys with :func:`as_yaml_keys`.

Every location a command writes goes through :func:`check_outputs` (when its config is made:
never equal to, inside or around an input; no file where a folder goes) and
:func:`probe_outputs` (when the run starts, before any work: no existing file overwritten
without ``--force``, and the location really is writable).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from safelora_ray.errors import ConfigError, StorageError
from safelora_ray.storage.base import check_uri, open_storage, refuse_overlap, split_uri

logger = logging.getLogger(__name__)

_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def flag(field: str) -> str:
    """The command-line flag of a config field (``num_proj_layers`` → ``--num-proj-layers``)."""
    return "--" + field.replace("_", "-")


def as_yaml_keys(message: str, section: str) -> str:
    """A config message with its flags written as keys of a YAML ``section``."""
    return _FLAG.sub(lambda m: f"{section}.{m.group(1).replace('-', '_')}", message)


def check_selection(threshold: float | None, num_proj_layers: int | None,
                    strict_k: bool, allow_none: bool = False) -> None:
    """Validate the SPEC §2 selection: exactly one of τ (a cosine, so in [−1, 1]) or k ≥ 1.

    Args:
        threshold: τ.
        num_proj_layers: k.
        strict_k: Exactly k, ties broken by name.
        allow_none: Neither may be given (SaLoRA's fold of every module).

    Raises:
        ConfigError: naming the flag and, for a likely slip (35 for 0.35), the fix.
    """
    if threshold is not None and num_proj_layers is not None:
        raise ConfigError("give at most one of --threshold or --num-proj-layers" if allow_none
                          else "give exactly one of --threshold or --num-proj-layers")
    if threshold is None and num_proj_layers is None and not allow_none:
        raise ConfigError("give exactly one of --threshold or --num-proj-layers")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigError(f"--threshold must be a number, got {threshold!r}")
        if not math.isfinite(threshold):
            raise ConfigError(f"--threshold must be a finite number, got {threshold}")
        if not -1.0 <= threshold <= 1.0:
            # Only a value that reads as a percentage (35 for 0.35) gets a guess: for 3.5 or
            # -2, 0.035 or -0.02 would be a guess at a slip we cannot know.
            hint = (f" (did you mean {threshold / 100:g}?)" if 10 <= abs(threshold) <= 100
                    else "")
            raise ConfigError(
                f"--threshold {threshold:g} is outside [-1, 1]: it is compared with a cosine, "
                f"which lies in [-1, 1]{hint}; 1 would project every module and -1 almost "
                "none (the paper uses 0.35)")
    if num_proj_layers is not None:
        if isinstance(num_proj_layers, bool) or not isinstance(num_proj_layers, int):
            raise ConfigError(f"--num-proj-layers must be a whole number, got "
                              f"{num_proj_layers!r}")
        if num_proj_layers < 1:
            raise ConfigError(f"--num-proj-layers must be ≥ 1, got {num_proj_layers}")
    if strict_k and num_proj_layers is None:
        raise ConfigError("--strict-k needs --num-proj-layers")


def selection_record(threshold: float | None, num_proj_layers: int | None,
                     strict_k: bool) -> dict[str, Any]:
    """The selection as recorded in ledgers, provenance and reports (``all``: neither)."""
    if threshold is not None:
        return {"mode": "threshold", "threshold": threshold}
    if num_proj_layers is None:
        return {"mode": "all"}
    return {"mode": "number", "num_proj_layers": num_proj_layers, "strict": strict_k}


def check_at_least(value: float | int, field: str, minimum: float | int,
                   note: str = "") -> None:
    """Raise unless ``value`` ≥ ``minimum`` (messages name ``field``'s flag)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{flag(field)} must be ≥ {minimum}{note}, got {value!r}")


def check_positive(value: float | int, field: str) -> None:
    """Raise unless ``value`` > 0 and finite."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{flag(field)} must be a positive number, got {value!r}")


def env_number(name: str, default: float, kind: type = float) -> Any:
    """The number in environment variable ``name`` (``default`` when unset), read as ``kind``
    (``int`` or ``float``); a value that is not one is an error naming the variable."""
    import os

    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not "
                          f"{'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"environment variable {name}={raw!r} is not a finite number")
    return value


# ---------------------------------------------------------------------------------------------
# Outputs: the one rule every writing flag follows
# ---------------------------------------------------------------------------------------------

#: Name prefix of the probe file (object) written and removed to test a location.
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


__all__ = ["Output", "as_yaml_keys", "check_at_least", "check_outputs", "check_positive",
           "check_selection", "env_number", "flag", "probe_outputs", "selection_record"]
