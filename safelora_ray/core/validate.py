"""Validation shared by the configs: numbers, the selection, environment numbers.

Messages name the command-line flags (``--num-proj-layers``), which is what most users typed;
the nightly job rewrites them into its YAML keys with :func:`as_yaml_keys`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

from safelora_ray.core.errors import ConfigError

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
    """Validate the SPEC §2 selection: exactly one of τ (a cosine, so in [−1, 1]) or k ≥ 1
    (what :class:`~safelora_ray.core.selection.Selection` checks when it is made).

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



__all__ = ["as_yaml_keys", "check_at_least", "check_positive", "check_selection", "env_number",
           "flag"]
