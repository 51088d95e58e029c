"""Exception types.

Every error raised for bad input names what is wrong and where (the URI, file, tensor,
module or adapter), so that an operator reading one line of a fleet report can act on it.
"""

from __future__ import annotations


class SafeLoraError(Exception):
    """Base class of all errors raised by safelora-ray."""


class StorageError(SafeLoraError):
    """A storage operation failed (missing object, denied access, unsupported URI)."""


class NotFoundError(StorageError):
    """The object or file does not exist."""


class SafetensorsFormatError(SafeLoraError):
    """A safetensors file is malformed; the message names the file and, where known, the tensor."""


class CheckpointError(SafeLoraError):
    """A checkpoint (or a base/aligned pair) cannot be used: missing, mismatched or bad tensors."""


class AlignmentSetError(SafeLoraError):
    """An alignment set is missing, incomplete (interrupted build) or inconsistent."""


class AdapterError(SafeLoraError):
    """A LoRA adapter cannot be sanitized; the message names the adapter and the reason."""


class ClusterError(SafeLoraError):
    """The Ray cluster cannot be reached, or lost the resources a run needs."""


class Interrupted(SafeLoraError):
    """The run was interrupted (Ctrl-C); the task stopped at a safe point."""


class ConfigError(SafeLoraError, ValueError):
    """Invalid user configuration (flags, config files, parameters)."""


class LeaseHeldError(SafeLoraError):
    """Another live run holds the lease on an output (the message names it): exit 4."""
